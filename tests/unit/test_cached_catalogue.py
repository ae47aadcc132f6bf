"""The cached catalogue: TTLs, negative answers, single flight, invalidation, statistics.

Runs on trio's MockClock (``autojump_clock``): TTL expiry is exact and instant. Backend calls run on
real worker threads against the in-memory catalogue, which can be paused to hold a call in flight.
"""

from __future__ import annotations

import json
import threading
import tracemalloc
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from datalakefs.catalogue.cached import CachedCatalogue, replica_batch
from datalakefs.catalogue.fake import FakeCatalogue
from datalakefs.config import Config
from datalakefs.errors import AccessDeniedError, CatalogueUnavailableError, NotFoundError
from datalakefs.model import DID, DIDInfo, DIDType, FileReplicas

TTL = 300.0
NEGATIVE_TTL = 10.0
F1, F2, F3, RUN1, NOPE = (DID("data", n) for n in ("f1", "f2", "f3", "run1", "nope"))


@pytest.fixture
def fake() -> Iterator[FakeCatalogue]:
    catalogue = FakeCatalogue()
    catalogue.add_dataset(RUN1)
    for did, size in ((F1, 1), (F2, 2), (F3, 3)):
        catalogue.add_file(did, size, adler32=f"0000000{size}")
    catalogue.attach(RUN1, F1, F2)
    catalogue.add_replica(F1, "SITE-A", "http://a/f1")
    catalogue.set_metadata(F1, "run_number", 7)
    yield catalogue
    catalogue.resume()  # never leave a worker thread blocked behind a failed test


def cached(fake: FakeCatalogue, concurrency: int = 4) -> CachedCatalogue:
    config = Config(catalogue_ttl=TTL, negative_ttl=NEGATIVE_TTL, catalogue_concurrency=concurrency)
    return CachedCatalogue(fake, config)


async def test_answers_are_cached_for_the_ttl(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    first = await catalogue.get_info(F1)
    await trio.sleep(TTL - 1)
    assert await catalogue.get_info(F1) == first
    assert fake.calls["get_info"] == 1
    await trio.sleep(2)
    await catalogue.get_info(F1)
    assert fake.calls["get_info"] == 2
    stats = catalogue.statistics()
    assert (stats.hits, stats.misses, stats.calls["get_info"]) == (1, 2, 2)


async def test_every_method_is_cached(fake: FakeCatalogue, autojump_clock: trio.testing.MockClock) -> None:
    catalogue = cached(fake)
    for _ in range(2):
        assert await catalogue.list_scopes() == ["data"]
        assert [i.did for i in await catalogue.list_collections("data")] == [RUN1]
        assert [i.did for i in await catalogue.list_content(RUN1)] == [F1, F2]
        assert (await catalogue.get_metadata(F1))["run_number"] == "7"
        assert [i.did for i in await catalogue.query("data", "run_number=7")] == [F1]
    assert set(fake.calls.values()) == {1}
    assert len(fake.calls) == 5


async def test_not_found_is_cached_for_the_negative_ttl(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    for _ in range(2):
        with pytest.raises(NotFoundError, match="nope"):
            await catalogue.get_info(NOPE)
    assert fake.calls["get_info"] == 1
    fake.add_file(NOPE, 9)
    await trio.sleep(NEGATIVE_TTL + 1)
    assert (await catalogue.get_info(NOPE)).size == 9
    stats = catalogue.statistics()
    assert stats.negative_hits == 1
    assert stats.errors == {}  # "not found" is an answer, not an error


async def test_errors_are_not_cached_and_are_reported(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    fake.fail(CatalogueUnavailableError("rucio.example: connection refused"))
    for _ in range(2):
        with pytest.raises(CatalogueUnavailableError):
            await catalogue.list_scopes()
    fake.fail(AccessDeniedError("token expired"), methods=["get_info"])
    with pytest.raises(AccessDeniedError):
        await catalogue.get_info(F1)
    fake.fail(None)
    assert await catalogue.list_scopes() == ["data"]
    stats = catalogue.statistics()
    assert fake.calls["list_scopes"] == 3
    assert dict(stats.errors) == {"list_scopes": 2, "get_info": 1}
    assert stats.last_error == "get_info: token expired"
    assert stats.last_error_at is not None


async def test_concurrent_identical_calls_share_one_flight(fake: FakeCatalogue) -> None:
    catalogue = cached(fake)
    results: list[DIDInfo] = []

    async def ask() -> None:
        results.append(await catalogue.get_info(F1))

    fake.pause()
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert catalogue.statistics().in_flight == 1
        fake.resume()
    assert fake.calls["get_info"] == 1
    assert len(results) == 5
    assert len(set(results)) == 1
    assert catalogue.statistics().shared == 4


async def test_a_shared_failure_reaches_every_waiter(fake: FakeCatalogue) -> None:
    catalogue = cached(fake)
    failures: list[BaseException] = []

    async def ask() -> None:
        try:
            await catalogue.list_content(RUN1)
        except CatalogueUnavailableError as exc:
            failures.append(exc)

    fake.fail(CatalogueUnavailableError("server said 503"))
    fake.pause()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        fake.resume()
    assert fake.calls["list_content"] == 1
    assert len(failures) == 3
    assert len({id(f) for f in failures}) == 3  # each waiter gets its own exception object


async def test_cancelled_leader_hands_over(fake: FakeCatalogue) -> None:
    catalogue = cached(fake)
    results: list[DIDInfo] = []
    leader_scope = trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await catalogue.get_info(F2)

    async def follower() -> None:
        results.append(await catalogue.get_info(F2))

    fake.pause()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader)
        # The leader's worker thread counts its call when the OS runs it, which trio does not wait
        # for: under load it could come after the last assertion (the thread is abandoned).
        assert await trio.to_thread.run_sync(fake.wait_calls, "get_info", 1, 30.0)
        nursery.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()  # the leader abandons its worker thread
        await trio.testing.wait_all_tasks_blocked()
        assert catalogue.statistics().in_flight == 1  # the follower's own call
        fake.resume()
    assert leader_scope.cancelled_caught
    assert [r.did for r in results] == [F2]
    assert fake.calls["get_info"] == 2


async def test_bulk_infos_are_cached_per_did(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    infos = await catalogue.get_infos([F2, NOPE, F1, F2])
    assert [i.did for i in infos] == [F2, F1]
    assert fake.calls["get_infos"] == 1
    assert (await catalogue.get_info(F1)).size == 1  # served by the bulk answer
    with pytest.raises(NotFoundError):
        await catalogue.get_info(NOPE)  # the bulk answer's "unknown" is remembered too
    assert fake.calls["get_info"] == 0
    assert [i.did for i in await catalogue.get_infos([F1, F3, NOPE])] == [F1, F3]
    assert fake.calls["get_infos"] == 2
    assert catalogue.statistics().misses == 4  # F2, NOPE, F1, then F3


async def test_replicas_are_cached_per_file(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    first = await catalogue.list_replicas([F1, F2])
    assert [r.info.did for r in first] == [F1, F2]
    assert [r.rse for r in first[0].replicas] == ["SITE-A"]
    assert await catalogue.list_replicas([F2, F1]) == first[::-1]
    assert fake.calls["list_replicas"] == 1


async def test_invalidate_collection_shows_the_daemons_own_changes(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    new_dataset, new_file = DID("data", "run2"), DID("data", "up.dat")
    assert [i.did for i in await catalogue.list_content(RUN1)] == [F1, F2]
    assert [i.did for i in await catalogue.list_collections("data")] == [RUN1]
    assert [i.did for i in await catalogue.query("data", "run*")] == [RUN1]
    with pytest.raises(NotFoundError):
        await catalogue.get_info(new_file)
    fake.add_file(new_file, 4)
    fake.add_dataset(new_dataset)
    fake.attach(RUN1, new_file)
    fake.attach(new_dataset, new_file)
    assert [i.did for i in await catalogue.list_content(RUN1)] == [F1, F2]  # still cached
    catalogue.invalidate(new_file)
    catalogue.invalidate_collection(RUN1)
    catalogue.invalidate_collection(new_dataset)
    assert [i.did for i in await catalogue.list_content(RUN1)] == [F1, F2, new_file]
    assert [i.did for i in await catalogue.list_collections("data")] == [RUN1, new_dataset]
    assert [i.did for i in await catalogue.query("data", "run*")] == [RUN1, new_dataset]
    assert (await catalogue.get_info(new_file)).size == 4


async def test_invalidate_forgets_a_dids_facts(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    await catalogue.get_info(F1)
    await catalogue.get_metadata(F1)
    await catalogue.list_replicas([F1])
    catalogue.invalidate(F1)
    await catalogue.get_info(F1)
    await catalogue.get_metadata(F1)
    await catalogue.list_replicas([F1])
    assert (fake.calls["get_info"], fake.calls["get_metadata"], fake.calls["list_replicas"]) == (2, 2, 2)


async def test_an_answer_in_flight_during_invalidation_is_not_cached(fake: FakeCatalogue) -> None:
    catalogue = cached(fake)
    fake.pause()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(catalogue.list_content, RUN1)
        await trio.testing.wait_all_tasks_blocked()
        catalogue.invalidate_collection(RUN1)
        assert catalogue.statistics().in_flight == 0  # detached: new callers do not join it
        fake.resume()
    await catalogue.list_content(RUN1)
    assert fake.calls["list_content"] == 2


async def test_answers_are_copies(fake: FakeCatalogue, autojump_clock: trio.testing.MockClock) -> None:
    catalogue = cached(fake)
    content = await catalogue.list_content(RUN1)
    content.clear()
    meta = await catalogue.get_metadata(F1)
    meta["run_number"] = "0"
    assert len(await catalogue.list_content(RUN1)) == 2
    assert (await catalogue.get_metadata(F1))["run_number"] == "7"


async def test_the_limiter_bounds_worker_threads(fake: FakeCatalogue) -> None:
    limiter = trio.CapacityLimiter(2)
    catalogue = CachedCatalogue(fake, Config(), limiter=limiter)
    fake.pause()
    async with trio.open_nursery() as nursery:
        for did in (F1, F2, F3, RUN1):
            nursery.start_soon(catalogue.get_metadata, did)
        nursery.start_soon(catalogue.list_scopes)
        await trio.testing.wait_all_tasks_blocked()
        assert (limiter.statistics().borrowed_tokens, limiter.statistics().tasks_waiting) == (2, 3)
        fake.resume()
    assert sum(fake.calls.values()) == 5


async def test_statistics_are_an_immutable_json_ready_snapshot(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    await catalogue.list_scopes()
    before = catalogue.statistics()
    await catalogue.list_collections("data")
    assert dict(before.calls) == {"list_scopes": 1}
    with pytest.raises(TypeError):
        before.calls["list_scopes"] = 5  # type: ignore[index]
    document = json.loads(json.dumps(catalogue.statistics().as_dict()))
    assert document["calls"] == {"list_scopes": 1, "list_collections": 1}
    assert document["cached_entries"] == 2


def many_files_dataset(fake: FakeCatalogue, name: str, count: int) -> tuple[DID, list[DID]]:
    dataset = DID("data", name)
    files = [DID("data", f"{name}.{index:05d}") for index in range(count)]
    fake.add_dataset(dataset)
    for did in files:
        fake.add_file(did, 1)
        fake.add_replica(did, "SITE-A", f"http://a/{did.name}")
    fake.attach(dataset, *files)
    return dataset, files


async def listed_dataset(fake: FakeCatalogue, name: str, count: int) -> tuple[CachedCatalogue, DID, list[DID]]:
    """A cached catalogue that has listed a new dataset of ``count`` files with one replica each."""
    catalogue = cached(fake)
    dataset, files = many_files_dataset(fake, name, count)
    await catalogue.list_content(dataset)
    return catalogue, dataset, files


async def test_opening_every_file_of_a_small_listed_dataset_costs_one_replica_call(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue, _, files = await listed_dataset(fake, "run9", 50)
    for did in files:
        [found] = await catalogue.list_replicas([did])
        assert (found.info.did, [r.pfn for r in found.replicas]) == (did, [f"http://a/{did.name}"])
    assert fake.calls["list_replicas"] == 1


async def test_concurrent_opens_in_one_dataset_share_its_replica_call(fake: FakeCatalogue) -> None:
    catalogue, _, files = await listed_dataset(fake, "run9", 16)
    fake.pause()
    async with trio.open_nursery() as nursery:
        for did in files:
            nursery.start_soon(catalogue.list_replicas, [did])
        await trio.testing.wait_all_tasks_blocked()
        fake.resume()
    assert fake.calls["list_replicas"] == 1
    assert catalogue.statistics().shared == 15


def test_replica_batches_double_up_to_the_servers_limit() -> None:
    assert [replica_batch(p) for p in (0, 99, 100, 299, 300, 699, 700, 1499, 1500, 2499, 2500)] == [
        (0, 100), (0, 100), (100, 300), (100, 300), (300, 700), (300, 700),
        (700, 1500), (700, 1500), (1500, 2500), (1500, 2500), (2500, 3500),
    ]


async def test_a_large_dataset_resolves_replicas_in_batches_around_the_opened_file(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue, _, files = await listed_dataset(fake, "big", 1600)
    await catalogue.list_replicas([files[350]])  # batch 300..699
    for did in files[300:700]:
        await catalogue.list_replicas([did])
    assert fake.calls["list_replicas"] == 1
    for did in files:
        [found] = await catalogue.list_replicas([did])
        assert found.info.did == did
    assert fake.calls["list_replicas"] == 5  # 0..99, 100..299, 700..1499, 1500..1599


@pytest.mark.parametrize("how", ["ttl", "invalidation"])
async def test_a_datasets_new_replica_is_seen_after_the_ttl_or_at_once_when_invalidated(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    catalogue, dataset, files = await listed_dataset(fake, "run9", 5)
    await catalogue.list_replicas([files[0]])
    fake.add_replica(files[3], "SITE-B", "http://b/x")
    [before] = await catalogue.list_replicas([files[3]])
    assert [r.rse for r in before.replicas] == ["SITE-A"]
    if how == "ttl":
        await trio.sleep(TTL + 1)  # the listing expired too, and is not asked for again
    else:
        catalogue.invalidate_collection(dataset)
        await catalogue.list_content(dataset)
    for did in files:
        await catalogue.list_replicas([did])
    [after] = await catalogue.list_replicas([files[3]])
    assert [r.rse for r in after.replicas] == ["SITE-A", "SITE-B"]
    assert fake.calls["list_replicas"] == 2
    assert fake.calls["list_content"] == (1 if how == "ttl" else 2)


async def test_a_listed_file_without_replicas_is_not_asked_for_alone(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    await catalogue.list_content(RUN1)
    [f2] = await catalogue.list_replicas([F2])
    assert (f2.info.did, f2.replicas) == (F2, ())
    await catalogue.list_replicas([F1])
    assert fake.calls["list_replicas"] == 1


async def test_files_of_a_query_result_are_resolved_in_one_batch(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    _, files = many_files_dataset(fake, "run9", 20)
    listed = [info.did for info in await catalogue.query("data", "run9.*")]
    assert listed == files
    for did in files:
        [found] = await catalogue.list_replicas([did])
        assert [r.rse for r in found.replicas] == ["SITE-A"]
    assert fake.calls["list_replicas"] == 1
    catalogue.invalidate_collection(DID("data", "run9"))  # forgets the scope's query results too
    await catalogue.list_replicas([files[0]])
    assert fake.calls["list_replicas"] == 2


async def calls_reach(fake: FakeCatalogue, method: str, count: int) -> None:
    """Wait until ``count`` calls of ``method`` entered the fake (a paused call is counted when it enters)."""
    with trio.fail_after(30):
        while fake.calls[method] < count:  # noqa: ASYNC110 - counted on worker threads, no event to wait for
            await trio.sleep(0.001)
    await trio.testing.wait_all_tasks_blocked()


async def settled(catalogue: CachedCatalogue) -> None:
    """Wait until no catalogue call is in flight and no sweep runs (calls run on worker threads, which
    ``wait_all_tasks_blocked`` counts as blocked)."""
    with trio.fail_after(30):
        while (stats := catalogue.statistics()).in_flight or stats.sweeping:  # noqa: ASYNC110 - ends on threads
            await trio.sleep(0.001)


async def test_the_first_open_in_a_listing_sweeps_the_rest_in_the_background(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue, _, files = await listed_dataset(fake, "big", 1600)
    async with trio.open_nursery() as nursery:
        await nursery.start(catalogue.run)
        await catalogue.list_replicas([files[350]])  # its own batch, 300..699, then the sweep
        await settled(catalogue)
        assert fake.calls["list_replicas"] == 5  # 300..699, then 700..1499, 1500..1599, 0..99, 100..299
        for did in files:
            [found] = await catalogue.list_replicas([did])
            assert [r.pfn for r in found.replicas] == [f"http://a/{did.name}"]
        assert fake.calls["list_replicas"] == 5  # every open found its replicas cached
        nursery.cancel_scope.cancel()


async def open_first_and_hold_the_sweep(
    fake: FakeCatalogue, catalogue: CachedCatalogue, files: list[DID], nursery: trio.Nursery
) -> None:
    """Run ``catalogue``'s sweeps in ``nursery``, open the listing's first file, and hold the
    catalogue calls that follow (the sweep's, started when the opener's batch was answered)."""
    await nursery.start(catalogue.run)
    await catalogue.list_replicas([files[0]])
    fake.pause()
    await calls_reach(fake, "list_replicas", 3)


async def test_an_open_joins_the_sweeps_call_for_its_batch(fake: FakeCatalogue) -> None:
    catalogue, _, files = await listed_dataset(fake, "big", 1600)
    async with trio.open_nursery() as nursery:
        await open_first_and_hold_the_sweep(fake, catalogue, files, nursery)
        # the opener's batch and two sweep batches (100..299, 300..699): no more at once
        assert fake.calls["list_replicas"] == 3
        shared = catalogue.statistics().shared
        nursery.start_soon(catalogue.list_replicas, [files[150]])
        await trio.testing.wait_all_tasks_blocked()
        assert fake.calls["list_replicas"] == 3  # joined the sweep's call instead of making one
        assert catalogue.statistics().shared == shared + 1
        fake.resume()
        await settled(catalogue)
        assert fake.calls["list_replicas"] == 5
        nursery.cancel_scope.cancel()


async def test_invalidating_a_dataset_stops_its_sweep(fake: FakeCatalogue) -> None:
    catalogue, dataset, files = await listed_dataset(fake, "big", 3000)
    async with trio.open_nursery() as nursery:
        await open_first_and_hold_the_sweep(fake, catalogue, files, nursery)
        assert fake.calls["list_replicas"] == 3
        catalogue.invalidate_collection(dataset)
        fake.resume()
        await settled(catalogue)
        assert fake.calls["list_replicas"] == 3  # the calls in flight ended; no new batch was started
        nursery.cancel_scope.cancel()


async def test_a_failing_sweep_is_logged_and_the_opener_gets_the_error_itself(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    catalogue, _, files = await listed_dataset(fake, "big", 1600)
    async with trio.open_nursery() as nursery:
        await nursery.start(catalogue.run)
        await catalogue.list_replicas([files[0]])
        fake.fail(CatalogueUnavailableError("server down"), ["list_replicas"])  # before the sweep runs
        await settled(catalogue)
        assert "event=replica-sweep-failed" in caplog.text
        with pytest.raises(CatalogueUnavailableError):
            await catalogue.list_replicas([files[1500]])
        fake.fail(None)
        [found] = await catalogue.list_replicas([files[1500]])
        assert found.info.did == files[1500]
        nursery.cancel_scope.cancel()


async def test_a_dataset_on_a_deterministic_rse_is_located_after_one_replica_call(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    fake.deterministic["SITE-A"] = "http://a/"  # the names the fake gives its replicas
    catalogue, _, files = await listed_dataset(fake, "big", 1600)
    async with trio.open_nursery() as nursery:
        await nursery.start(catalogue.run)
        first = await catalogue.locate(files[350])
        assert first is not None and not first.presumed  # the catalogue's own answer
        for did in files:
            found = await catalogue.locate(did)
            assert found is not None and [r.pfn for r in found.replicas] == [f"http://a/{did.name}"]
            assert found.presumed == (not 350 <= files.index(did) < 450)  # the 100 files from the first opened
        await settled(catalogue)
        assert (fake.calls["list_replicas"], fake.calls["derive_pfns"]) == (1, 1)  # and no sweep
        nursery.cancel_scope.cancel()


async def test_the_first_opener_does_not_wait_for_the_presumption_and_the_others_do(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    """Deriving names may cost a second round trip (the RSE's settings, on a fresh mount): the opener
    whose file the first batch answered gets it at once; an opener elsewhere in the dataset waits for the
    presumption instead of asking the catalogue itself."""
    fake.deterministic["SITE-A"] = "http://a/"
    catalogue, _, files = await listed_dataset(fake, "big", 1600)
    asked, gate = threading.Event(), threading.Event()
    derive = fake.derive_pfns

    def slow_derive(rse: str, dids: list[DID]) -> dict[DID, str]:
        asked.set()
        gate.wait(30)
        return derive(rse, dids)

    fake.derive_pfns = slow_derive  # type: ignore[method-assign]
    located: list[FileReplicas | None] = []
    second = trio.Event()

    async def locate(did: DID) -> None:
        located.append(await catalogue.locate(did))
        if len(located) == 2:
            second.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(catalogue.run)
        nursery.start_soon(locate, files[350])
        assert await trio.to_thread.run_sync(asked.wait, 30.0)
        await trio.testing.wait_all_tasks_blocked()
        [first] = located  # answered while the names are still being derived
        assert first is not None and not first.presumed
        nursery.start_soon(locate, files[1200])
        await trio.testing.wait_all_tasks_blocked()
        assert len(located) == 1 and fake.calls["list_replicas"] == 1  # it waits, and asks nothing
        gate.set()
        await second.wait()
        found = located[1]
        assert found is not None and found.presumed and [r.pfn for r in found.replicas] == [f"http://a/{files[1200].name}"]
        assert (fake.calls["list_replicas"], fake.calls["derive_pfns"]) == (1, 1)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("why", ["other names", "split over RSEs"])
async def test_nothing_is_presumed_unless_the_batch_proves_the_naming_and_the_placement(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock, why: str
) -> None:
    fake.deterministic["SITE-A"] = "http://elsewhere/" if why == "other names" else "http://a/"
    catalogue, _, files = await listed_dataset(fake, "run9", 50)
    if why == "split over RSEs":
        fake.add_replica(files[1], "SITE-B", "http://b/x")
        fake.remove_replica(files[1], "SITE-A")
    await catalogue.locate(files[0])
    for did in files[2:]:
        found = await catalogue.locate(did)
        assert found is not None and not found.presumed


@pytest.mark.parametrize(("site_a_names", "preference", "presumed_at", "derived"), [
    ("http://a/", (), "SITE-A", 1),  # the catalogue's order
    ("http://a/", ("SITE-B",), "SITE-B", 1),  # rse_preference first
    ("http://elsewhere/", (), "SITE-B", 2),  # an RSE whose names do not match is passed over
])
async def test_a_dataset_held_by_several_rses_is_presumed_at_one_and_derived_once(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock,
    site_a_names: str, preference: tuple[str, ...], presumed_at: str, derived: int,
) -> None:
    fake.deterministic.update({"SITE-A": site_a_names, "SITE-B": "http://b/"})
    dataset, files = many_files_dataset(fake, "big", 300)
    for did in files:
        fake.add_replica(did, "SITE-B", f"http://b/{did.name}")
    config = Config(catalogue_ttl=TTL, negative_ttl=NEGATIVE_TTL, rse_preference=preference)
    catalogue = CachedCatalogue(fake, config)
    await catalogue.list_content(dataset)
    await catalogue.locate(files[0])
    found = await catalogue.locate(files[200])
    assert found is not None and found.presumed
    assert [(r.rse, r.pfn) for r in found.replicas] == [(presumed_at, f"http://{presumed_at[-1].lower()}/{files[200].name}")]
    assert (fake.calls["list_replicas"], fake.calls["derive_pfns"]) == (1, derived)


async def test_the_catalogues_answer_is_still_what_list_replicas_and_invalidation_see(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    fake.deterministic["SITE-A"] = "http://a/"
    catalogue, dataset, files = await listed_dataset(fake, "big", 300)
    fake.add_replica(files[200], "SITE-B", "http://b/200")
    await catalogue.locate(files[0])
    presumed = await catalogue.locate(files[200])
    assert presumed is not None and presumed.presumed and [r.rse for r in presumed.replicas] == ["SITE-A"]
    [asked] = await catalogue.list_replicas([files[200]])  # `user.rucio.replicas`: what the catalogue says
    assert (asked.presumed, [r.rse for r in asked.replicas]) == (False, ["SITE-A", "SITE-B"])
    catalogue.invalidate_collection(dataset)
    await catalogue.list_content(dataset)
    found = await catalogue.locate(files[250])
    assert found is not None and not found.presumed  # forgotten with the dataset, asked again


async def test_sixteen_workers_starting_across_a_dataset_share_one_replica_call(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    fake.deterministic["SITE-A"] = "http://a/"
    catalogue, _, files = await listed_dataset(fake, "big", 10_000)
    found: dict[DID, FileReplicas | None] = {}

    async def worker(did: DID) -> None:
        found[did] = await catalogue.locate(did)

    async with trio.open_nursery() as nursery:
        for start in range(0, 10_000, 625):  # each worker's first file
            nursery.start_soon(worker, files[start])
    assert fake.calls["list_replicas"] == 1
    assert all(f is not None and [r.pfn for r in f.replicas] == [f"http://a/{d.name}"] for d, f in found.items())


async def test_a_dataset_is_listed_by_its_files_cached_as_its_content(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    catalogue = cached(fake)
    fake.fail(CatalogueUnavailableError("a row 2 is not valid JSON"), methods=["list_files"])
    with pytest.raises(CatalogueUnavailableError, match="row 2"):
        await catalogue.list_content(RUN1, dataset=True)
    fake.fail(None)
    files = await catalogue.list_content(RUN1, dataset=True)  # the failure was not cached
    assert [info.did for info in files] == [F1, F2]
    assert await catalogue.list_content(RUN1) == files  # one listing, however it was asked
    assert (fake.calls["list_files"], fake.calls["list_content"]) == (2, 0)
    catalogue.invalidate(RUN1)
    await catalogue.list_content(RUN1, dataset=True)
    assert fake.calls["list_files"] == 3


async def test_listings_are_remembered_up_to_maxsize_files_in_all(
    fake: FakeCatalogue, autojump_clock: trio.testing.MockClock
) -> None:
    """The memory bound is in files, not listings: a listing pushed out by newer ones takes its files'
    homes along, and its files' replicas are then asked for one by one."""
    config = Config(catalogue_ttl=TTL, negative_ttl=NEGATIVE_TTL)
    catalogue = CachedCatalogue(fake, config, maxsize=100)
    older, older_files = many_files_dataset(fake, "older", 60)
    newer, newer_files = many_files_dataset(fake, "newer", 60)
    await catalogue.list_content(older)
    await catalogue.list_content(newer)
    for did in newer_files[:2]:
        await catalogue.list_replicas([did])
    assert fake.calls["list_replicas"] == 1  # one batch for both
    for did in older_files[:2]:
        await catalogue.list_replicas([did])
    assert fake.calls["list_replicas"] == 3  # forgotten: one call each


class _Prebuilt:
    """A backend whose dataset listing is built once, before the measurement."""

    def __init__(self, files: list[DIDInfo]) -> None:
        self.files = files

    def list_files(self, did: DID) -> Iterator[list[DIDInfo]]:
        yield self.files


async def test_a_listing_costs_the_cache_little_beyond_its_infos() -> None:
    """Remembering where each of 20,000 listed files was listed (for its replicas) cost about 300
    bytes per file in an LRU cache; a plain dict from DID to listing costs well under 100."""
    files = [DIDInfo(DID("data", f"big.{i:05d}"), DIDType.FILE, size=1) for i in range(20_000)]
    catalogue = CachedCatalogue(_Prebuilt(files), Config())  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        listed = await catalogue.list_content(DID("data", "big"), dataset=True)
        del listed  # the caller's copy
        per_file = (tracemalloc.get_traced_memory()[0] - before) / len(files)
    finally:
        tracemalloc.stop()
    assert per_file < 100, per_file


#: the threads each hash of a :class:`_NotedDID` ran on
_HASHED_ON: list[str] = []


class _NotedDID(DID):
    """A DID that notes the thread of every hash of it."""

    __slots__ = ()

    def __hash__(self) -> int:
        _HASHED_ON.append(threading.current_thread().name)
        return DID.__hash__(self)


class _Batched:
    """A backend whose dataset listing arrives in batches of ``batch`` files, and which notes the
    files each replica call asks for (none of them has a replica)."""

    def __init__(self, files: list[DIDInfo], batch: int) -> None:
        self.files, self.batch = files, batch
        self.asked: list[list[DID]] = []

    def list_files(self, did: DID) -> Iterator[list[DIDInfo]]:
        for start in range(0, len(self.files), self.batch):
            yield self.files[start : start + self.batch]

    def list_replicas(self, dids: list[DID]) -> list[FileReplicas]:
        self.asked.append(list(dids))
        return []


async def test_a_listings_files_are_indexed_while_its_answer_arrives_not_at_its_end() -> None:
    """Where each file was listed (for its batch of replicas) is worked out on the worker thread as the
    batches arrive: the end of the answer, which every reader of the directory waits for, hashes no
    file's DID on the trio thread (for 100,000 files that cost 30 ms at the end of a cold ``ls -l``)."""
    files = [DIDInfo(_NotedDID("data", f"big.{i:03d}"), DIDType.FILE, size=1) for i in range(300)]
    backend = _Batched(files, batch=100)
    catalogue = CachedCatalogue(backend, Config())  # type: ignore[arg-type]
    _HASHED_ON.clear()
    assert len(await catalogue.list_content(DID("data", "big"), dataset=True)) == 300
    assert _HASHED_ON and threading.current_thread().name not in _HASHED_ON
    await catalogue.list_replicas([files[150].did])  # the index serves: the file's batch in one call
    assert backend.asked == [[info.did for info in files[100:300]]]


async def test_a_file_expected_to_open_has_its_batch_asked_in_the_background(fake: FakeCatalogue) -> None:
    """A lookup of a listed file (``expect_open``) asks for its batch's replicas at once, in the
    background; the open then finds them. Nothing for a DID no listing holds, or without ``run``."""
    catalogue, _, files = await listed_dataset(fake, "run9", 50)
    catalogue.expect_open(files[7])  # not running: nothing starts
    assert fake.calls["list_replicas"] == 0
    async with trio.open_nursery() as nursery:
        await nursery.start(catalogue.run)
        catalogue.expect_open(DID("data", "never-listed"))
        catalogue.expect_open(files[7])
        await calls_reach(fake, "list_replicas", 1)
        await settled(catalogue)
        found = await catalogue.locate(files[7])
        assert found is not None and [r.pfn for r in found.replicas] == [f"http://a/{files[7].name}"]
        assert fake.calls["list_replicas"] == 1
        nursery.cancel_scope.cancel()
