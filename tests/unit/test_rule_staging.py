"""Rule staging against the fake rule engine: reuse, waiting, EAGAIN/EIO, states, backoff, hybrid reads.

Runs on trio's MockClock, so poll intervals are exact; catalogue calls run on real worker threads
against :class:`~datalakefs.catalogue.fake.FakeCatalogue`. The clock jumps only after 100 ms of real
idleness, so that a catalogue call on a worker thread (slow on a loaded machine) ends before time
jumps past it.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.catalogue.fake import FakeCatalogue
from datalakefs.config import Config
from datalakefs.errors import ConfigError, InvalidNameError, TransferError, TryAgainError
from datalakefs.model import DID, DIDInfo, RuleState
from datalakefs.staging.policy import HybridFile, LocalFile, StagingContent, local_path, parse_local_paths
from datalakefs.staging.rule import RuleStager

RSE = "SCRATCH"
DS = DID("data", "run1")
F1, F2, F3 = (DID("data", n) for n in ("f1", "f2", "f3"))
POLL_MIN, POLL_MAX = 1.0, 8.0


@pytest.fixture
def clock(mock_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    mock_clock.autojump_threshold = 0.1
    return mock_clock


@pytest.fixture
def fake() -> Iterator[FakeCatalogue]:
    catalogue = FakeCatalogue()
    catalogue.add_dataset(DS)
    for did in (F1, F2, F3):
        catalogue.add_file(did, 10, adler32="00000001")
        catalogue.add_replica(did, "ORIGIN", f"root://origin//{did.name}")
    catalogue.attach(DS, F1, F2, F3)
    yield catalogue
    catalogue.resume()


def config(**changes: object) -> Config:
    return Config(staging="rule", staging_rse=RSE, staging_timeout=100.0).replace(**changes)


@pytest.fixture
async def stager(fake: FakeCatalogue) -> AsyncIterator[RuleStager]:
    conf = config()
    service = RuleStager(conf, CachedCatalogue(fake, conf), poll_min=POLL_MIN, poll_max=POLL_MAX)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()


async def info(fake: FakeCatalogue, did: DID) -> DIDInfo:
    return fake.get_info(did)


def only_rule(fake: FakeCatalogue) -> str:
    rules = fake.rules()
    assert len(rules) == 1, rules
    return rules[0].id


async def test_nonblocking_open_makes_one_rule_and_says_eagain(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    with pytest.raises(TryAgainError) as caught:
        await stager.stage_file(await info(fake, F1), wait=False)
    assert caught.value.errno == errno.EAGAIN
    assert "REPLICATING: 0/1 locks OK" in str(caught.value)
    with pytest.raises(TryAgainError):
        await stager.stage_file(await info(fake, F1), wait=False)
    rule_id = only_rule(fake)
    assert fake.calls["add_rule"] == 1
    fake.complete_locks(rule_id)
    await trio.sleep(POLL_MIN)
    replica = await stager.stage_file(await info(fake, F1), wait=False)
    assert replica.available and replica.rse == RSE
    assert stager.describe(F1) == f"rule {rule_id} OK: 1/1 locks OK; staged on {RSE}"


async def test_blocked_open_returns_when_the_lock_is_ok(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    done: list[float] = []

    async def opener() -> None:
        await stager.stage_file(await info(fake, F1), wait=True)
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(opener)
        await trio.sleep(5)
        assert not done
        assert "REPLICATING" in (stager.describe(F1) or "")
        fake.complete_locks(only_rule(fake))
        completed_at = trio.current_time()
    assert done and done[0] - completed_at <= POLL_MAX


async def test_concurrent_opens_share_one_rule(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    async def opener() -> None:
        await stager.stage_file(await info(fake, F2), wait=True)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(opener)
        await trio.sleep(3)
        fake.complete_locks(only_rule(fake))
    assert fake.calls["add_rule"] == 1


async def test_a_dataset_rule_covering_the_file_is_reused(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    staged = await stager.stage(await info(fake, DS))
    assert staged.rule is not None and staged.rule.locks_total == 3
    with pytest.raises(TryAgainError):
        await stager.stage_file(await info(fake, F3), wait=False)
    assert only_rule(fake) == staged.rule.id
    assert stager.counters["rules_reused"] == 1
    fake.complete_locks(staged.rule.id, count=1)  # f1 only
    await trio.sleep(POLL_MAX * 2)
    assert "REPLICATING: 1/3 locks OK" in (stager.describe(DS) or "")
    fake.complete_locks(staged.rule.id)
    await trio.sleep(POLL_MAX * 2)
    assert stager.describe(DS) == f"rule {staged.rule.id} OK: 3/3 locks OK"
    assert (await stager.stage_file(await info(fake, F3), wait=False)).available


async def test_a_file_already_on_the_staging_rse_needs_no_rule(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    fake.add_replica(F1, RSE, "https://scratch/f1")
    replica = await stager.stage_file(await info(fake, F1), wait=True)
    assert replica.pfns == ("https://scratch/f1",)
    assert fake.calls["add_rule"] == 0 and not fake.rules()


async def test_stuck_rule_is_eio_with_the_reason_and_no_hang(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    failures: list[TransferError] = []

    async def opener() -> None:
        try:
            await stager.stage_file(await info(fake, F1), wait=True)
        except TransferError as exc:
            failures.append(exc)

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(opener)
        await trio.sleep(2)
        fake.fail_lock(only_rule(fake), F1, "TRANSFER forced failure by fts-shim")
    assert failures and failures[0].errno == errno.EIO
    assert "STUCK" in str(failures[0]) and "forced failure" in str(failures[0])
    assert trio.current_time() - started < 2 + POLL_MAX * 2
    assert "forced failure" in (stager.describe(F1) or "")
    with pytest.raises(TransferError):  # and again, at once, on the next open
        await stager.stage_file(await info(fake, F1), wait=False)


@pytest.mark.parametrize("state", [RuleState.SUSPENDED, RuleState.WAITING_APPROVAL, RuleState.INJECT])
async def test_other_states_are_reported_as_they_are(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock, state: RuleState
) -> None:
    with pytest.raises(TryAgainError):
        await stager.stage_file(await info(fake, F1), wait=False)
    fake.set_rule_state(only_rule(fake), state)
    await trio.sleep(POLL_MIN)
    with pytest.raises(TryAgainError) as caught:
        await stager.stage_file(await info(fake, F1), wait=False)
    assert f"{state.value}: 0/1 locks OK" in str(caught.value)


async def test_blocked_open_gives_up_after_the_staging_timeout(
    fake: FakeCatalogue, clock: trio.testing.MockClock
) -> None:
    conf = config(staging_timeout=30.0)
    service = RuleStager(conf, CachedCatalogue(fake, conf), poll_min=POLL_MIN, poll_max=POLL_MAX)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        started = trio.current_time()
        with pytest.raises(TryAgainError, match="REPLICATING"):
            await service.stage_file(await info(fake, F1), wait=True)
        assert trio.current_time() - started == pytest.approx(30.0, abs=0.5)
        nursery.cancel_scope.cancel()


async def test_polling_backs_off_and_stops_when_nobody_waits(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    with trio.move_on_after(60):
        await stager.stage_file(await info(fake, F1), wait=True)
    # polls at 1, 3, 7, 15, 23, ... seconds: doubling, then every POLL_MAX
    assert 8 <= fake.calls["get_rule"] <= 10
    polls = fake.calls["get_rule"]
    await trio.sleep(300)  # nobody waits any more: no poll
    assert fake.calls["get_rule"] == polls


async def test_reading_the_state_polls_at_most_once_per_interval(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    with pytest.raises(TryAgainError):
        await stager.stage_file(await info(fake, F1), wait=False)
    before = fake.calls["get_rule"]
    for _ in range(10):
        stager.describe(F1)
        await trio.sleep(POLL_MIN / 4)
    assert 1 <= fake.calls["get_rule"] - before <= 3
    fake.complete_locks(only_rule(fake))
    await trio.sleep(POLL_MIN)
    for _ in range(8):  # each read shows what is known and, when that is old, asks in the background
        await trio.sleep(POLL_MIN / 4)
        if "OK: 1/1" in (stager.describe(F1) or ""):
            break
    assert "OK: 1/1" in (stager.describe(F1) or "")


def test_local_path_mapping() -> None:
    mapping = parse_local_paths(["https://h:1/SCRATCH/=/srv/scratch/", "https://h:1/=/srv/all"])
    assert local_path(["https://h:1/SCRATCH/data/ab/f1"], mapping) == Path("/srv/scratch/data/ab/f1")
    assert local_path(["https://h:1/OTHER/f"], mapping) == Path("/srv/all/OTHER/f")
    assert local_path(["root://x//f"], mapping) is None
    assert local_path(["https://h:1/SCRATCH/../../etc/passwd"], mapping) is None
    with pytest.raises(ConfigError):
        parse_local_paths(["no-separator"])


class _Streamed:
    keep_cache = True

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0

    async def read(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return self.data[offset : offset + size]

    async def close(self) -> None:
        pass


async def test_hybrid_file_switches_to_the_local_replica_once_staged(
    fake: FakeCatalogue, clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    data = bytes(range(10))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f1").write_bytes(data)
    fake.set_rse_prefix(RSE, "https://scratch/")
    conf = config(staging="auto", staging_local_paths=(f"https://scratch/={tmp_path}",))
    catalogue = CachedCatalogue(fake, conf)
    stager = RuleStager(conf, catalogue, poll_min=POLL_MIN, poll_max=POLL_MAX)
    content = StagingContent(conf, None, stager, catalogue)  # type: ignore[arg-type]  # no streaming here
    async with trio.open_nursery() as nursery:
        await nursery.start(stager.run)
        staged = await stager.stage(await info(fake, DS))
        assert staged.rule is not None
        streamed = _Streamed(data)
        hybrid = HybridFile(content, await info(fake, F1), streamed,  # type: ignore[arg-type]  # a stand-in reader
                            stager.watch(await info(fake, F1)))
        assert await hybrid.read(0, 4) == data[:4]
        await trio.sleep(POLL_MIN * 1.5)  # the first look, then the first poll (which finds the rule)
        assert stager.counters["followed_while_copying"] == 1
        assert (stager.describe(F1) or "").startswith(f"rule {staged.rule.id} REPLICATING: 0/3 locks OK")
        fake.complete_locks(staged.rule.id)
        await trio.sleep(POLL_MAX * 2)
        assert await hybrid.read(4, 6) == data[4:]
        assert streamed.reads == 1
        assert content.counters["hybrid_switches"] == 1 and content.counters["local_reads"] == 1
        assert staged.waiters == 0 or stager.known(F1) is not None
        await hybrid.close()
        assert (stager.known(F1) or pytest.fail("untracked")).waiters == 0
        local = await content.open_staged(await info(fake, F1), (await stager.replica(await info(fake, F1)))
                                          or pytest.fail("no replica"))
        assert isinstance(local, LocalFile)
        assert await local.read(8, 100) == data[8:]
        await local.close()
        nursery.cancel_scope.cancel()


def test_rule_or_auto_needs_a_staging_rse(fake: FakeCatalogue) -> None:
    conf = Config(staging="rule")
    with pytest.raises(ConfigError, match="staging_rse"):
        StagingContent(conf, None, None, None)  # type: ignore[arg-type]


async def test_a_deleted_rule_ends_the_wait_and_the_next_open_makes_a_new_one(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    gone: list[TryAgainError] = []

    async def opener() -> None:
        try:
            await stager.stage_file(await info(fake, F1), wait=True)
        except TryAgainError as exc:
            gone.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(opener)
        await trio.sleep(2)
        first = only_rule(fake)
        fake.delete_rule(first)
    assert gone and "is gone" in str(gone[0])
    with pytest.raises(TryAgainError):
        await stager.stage_file(await info(fake, F1), wait=False)
    assert [r.id for r in fake.rules()] != [first] and len(fake.rules()) == 1


async def test_rule_mode_opens_a_staged_file_from_its_local_path(
    fake: FakeCatalogue, clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    (tmp_path / "f1").write_bytes(b"0123456789")
    fake.add_replica(F1, RSE, "https://scratch/f1")
    conf = config(staging_local_paths=(f"https://scratch/={tmp_path}",))
    catalogue = CachedCatalogue(fake, conf)
    stager = RuleStager(conf, catalogue, poll_min=POLL_MIN, poll_max=POLL_MAX)
    content = StagingContent(conf, None, stager, catalogue)  # type: ignore[arg-type]  # never streams here
    opened = await content.open(await info(fake, F1), nonblocking=True)
    assert isinstance(opened, LocalFile)
    assert await opened.read(5, 100) == b"56789"
    await opened.close()
    assert content.state(await info(fake, F1)) == f"staged on {RSE}"
    assert content.counters["local_opens"] == 1 and not fake.rules()


async def test_the_stage_xattr_takes_one_and_makes_one_rule(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    content = StagingContent(config(), None, stager, CachedCatalogue(fake, config()))  # type: ignore[arg-type]
    with pytest.raises(InvalidNameError):
        await content.stage(await info(fake, DS), b"please")
    await content.stage(await info(fake, DS), b"1\n")
    await content.stage(await info(fake, DS), b"1")
    assert only_rule(fake)
    assert content.state(await info(fake, DS)).startswith("rule rule0001 REPLICATING: 0/3 locks OK")
    assert content.status()["collections"][0]["locks_total"] == 3


async def test_the_state_reports_rules_made_elsewhere(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    """A rule someone else made (``datalakefs stage``, the rucio CLI, another account) for the dataset:
    its state and each file's report it, and the daemon follows it to OK."""
    content = StagingContent(config(), None, stager, CachedCatalogue(fake, config()))  # type: ignore[arg-type]
    dataset, file = await info(fake, DS), await info(fake, F1)
    await content.look_up(dataset)
    assert content.state(dataset) == "not staged"
    rule, created = fake.add_rule(DS, RSE, None, None, "someone-else")
    assert created
    await content.look_up(dataset)
    await content.look_up(file)
    assert content.state(dataset).startswith(f"rule {rule.id} REPLICATING: 0/3 locks OK")
    assert content.state(file).startswith(f"rule {rule.id} REPLICATING")
    fake.complete_locks(rule.id)
    await trio.sleep(POLL_MIN)
    content.state(dataset)  # an old answer: one poll in the background
    await trio.sleep(POLL_MIN)
    assert content.state(dataset).startswith(f"rule {rule.id} OK: 3/3 locks OK")
    assert stager.counters["rules_found"] == 2 and fake.rules() == [fake.get_rule(rule.id)]


async def test_a_stuck_rule_elsewhere_is_reported_only_when_no_other_rule_is_there(
    fake: FakeCatalogue, stager: RuleStager, clock: trio.testing.MockClock
) -> None:
    stuck, _ = fake.add_rule(DS, RSE, None, None, "one")
    fake.set_rule_state(stuck.id, RuleState.STUCK)
    fine, _ = fake.add_rule(DS, RSE, None, None, "two")
    await stager.look_up(await info(fake, DS))
    assert (stager.describe(DS) or "").startswith(f"rule {fine.id} REPLICATING")
