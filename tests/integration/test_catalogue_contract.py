"""One contract, two catalogues: the same cases against the fake catalogue (which the unit tests of
staging and the outbox rely on) and the Rucio adapter on the test lake, so the fake cannot drift from
what Rucio answers.

Each case gets a fresh dataset of two files on the origin RSE and a staging RSE with nothing on it;
transfers to the staging RSE are held (the lake's FTS shim delays them, the fake never completes a
lock by itself), so a rule stays REPLICATING while the case looks at it.
"""

from __future__ import annotations

import contextlib
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from datalakefs.catalogue.fake import FakeCatalogue
from datalakefs.catalogue.rucio import RucioCatalogue
from datalakefs.config import Config
from datalakefs.demo import seed
from datalakefs.demo.lake import Lake
from datalakefs.demo.status import LakeStatus
from datalakefs.errors import NotFoundError
from datalakefs.model import DID, DIDInfo, DIDType, LockState, RuleState
from tests.fuse.waiting import wait_until

SIZES = (1000, 2500)
ORIGIN, SCRATCH = "LAKE-ORIGIN", "SCRATCH"


@dataclass
class World:
    """A catalogue with a fresh dataset, and what the test may do to the lake behind it."""

    catalogue: Any
    dataset: DID
    files: dict[DID, tuple[int, str]]  # size, adler32
    remove_rule: Callable[[str], None]
    made_rules: list[str] = field(default_factory=list)


def whole(batches: Iterator[list[DIDInfo]]) -> list[DIDInfo]:
    """Every row of a listing's batches, in order."""
    return [info for batch in batches for info in batch]


def _fake_world() -> World:
    fake = FakeCatalogue()
    scope = "user.demo"
    fake.add_scope(scope)
    dataset = DID(scope, f"contract_{uuid.uuid4().hex[:10]}")
    fake.add_dataset(dataset)
    files = {}
    for index, size in enumerate(SIZES):
        did = DID(scope, f"{dataset.name}.f{index}.bin")
        adler32 = f"{zlib.adler32(bytes(size)) & 0xFFFFFFFF:08x}"
        fake.add_file(did, size, adler32)
        fake.add_replica(did, ORIGIN, f"https://origin.fake/{scope}/{did.name}")
        fake.attach(dataset, did)
        files[did] = (size, adler32)
    return World(fake, dataset, files, fake.delete_rule)


def _rucio_world(lake: LakeStatus, client: Any, set_knobs: Callable[..., None]) -> Iterator[World]:
    assert lake.seed is not None and (lake.seed.origin_rse, lake.seed.scratch_rse) == (ORIGIN, SCRATCH)
    set_knobs(delay=600.0)
    scope = lake.seed.upload_scope
    name = f"contract_{uuid.uuid4().hex[:10]}"
    plan = seed.DatasetPlan(scope, name, tuple(seed.FileSpec(scope, f"{name}.f{i}.bin", size)
                                               for i, size in enumerate(SIZES)))
    written = seed.add_origin_dataset(client, Lake(lake.state_dir), plan)
    files = {DID(w.spec.scope, w.spec.name): (w.spec.size, w.adler32) for w in written}

    def remove_rule(rule_id: str) -> None:
        """Expired now, the lake's judge-cleaner removes it within a pass (delete-rule is soft)."""
        client.update_replication_rule(rule_id, {"lifetime": 0})

        def gone() -> bool:
            try:
                client.get_replication_rule(rule_id)
            except Exception as exc:  # rucio's RuleNotFound
                return type(exc).__name__ == "RuleNotFound"
            return False

        wait_until(gone, timeout=120, what=f"the judge-cleaner to remove rule {rule_id}")

    adapter = RucioCatalogue(Config(rucio_config=str(lake.rucio_config)))
    world = World(adapter, DID(scope, name), files, remove_rule)
    try:
        yield world
    finally:
        for rule_id in world.made_rules:
            with contextlib.suppress(Exception):  # removed by the case already
                client.update_replication_rule(rule_id, {"lifetime": 0})
        adapter.close()


@pytest.fixture(params=["fake", pytest.param("rucio", marks=pytest.mark.lake)])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    if request.param == "fake":
        yield _fake_world()
        return
    yield from _rucio_world(request.getfixturevalue("lake"), request.getfixturevalue("rucio_client"),
                            request.getfixturevalue("fts_knobs"))


def _add_rule(world: World, did: DID) -> Any:
    rule, created = world.catalogue.add_rule(did, SCRATCH, 3600, None, None)
    world.made_rules.append(rule.id)
    return rule, created


def test_facts_of_a_file_and_of_its_dataset(world: World) -> None:
    for did, (size, adler32) in world.files.items():
        info = world.catalogue.get_info(did)
        assert (info.type, info.size, info.adler32) == (DIDType.FILE, size, adler32)
    content = whole(world.catalogue.list_content(world.dataset))
    assert {(i.did, i.type, i.size) for i in content} == {(d, DIDType.FILE, s) for d, (s, _) in world.files.items()}
    # a dataset's content is its files; list_files gives no md5 where there is an adler32
    assert set(whole(world.catalogue.list_files(world.dataset))) == {replace(i, md5=None) for i in content}
    assert world.catalogue.get_info(world.dataset).type is DIDType.DATASET


def test_unknown_dids_and_rules_are_not_found(world: World) -> None:
    with pytest.raises(NotFoundError):
        world.catalogue.get_info(DID(world.dataset.scope, "no-such-file-" + uuid.uuid4().hex))
    with pytest.raises(NotFoundError):
        world.catalogue.get_rule(uuid.uuid4().hex)


def test_replicas_on_an_rse(world: World) -> None:
    did = next(iter(world.files))
    on_origin = world.catalogue.replica_on(did, ORIGIN)
    assert on_origin is not None and on_origin.rse == ORIGIN and on_origin.available and on_origin.pfns
    assert world.catalogue.replica_on(did, SCRATCH) is None
    [found] = world.catalogue.list_replicas([did])
    assert found.info.did == did and ORIGIN in {r.rse for r in found.replicas}


def test_a_file_rule_is_made_once_and_covers_its_file(world: World) -> None:
    did = next(iter(world.files))
    rule, created = _add_rule(world, did)
    assert created
    assert (rule.did, rule.rse_expression, rule.state) == (did, SCRATCH, RuleState.REPLICATING)
    again, created_again = _add_rule(world, did)
    assert (again.id, created_again) == (rule.id, False)  # Rucio's DuplicateRule, resolved
    assert [r.id for r in world.catalogue.file_rules(did)] == [rule.id]
    copying = world.catalogue.replica_on(did, SCRATCH)
    assert copying is not None and not copying.available and copying.pfns
    [lock] = world.catalogue.rule_locks(world.catalogue.get_rule(rule.id))
    assert (lock.did, lock.rse, lock.state, lock.size) == (did, SCRATCH, LockState.REPLICATING, world.files[did][0])


def test_a_dataset_rule_locks_every_file_and_covers_each(world: World) -> None:
    rule, created = _add_rule(world, world.dataset)
    assert created and rule.did == world.dataset
    locks = world.catalogue.rule_locks(world.catalogue.get_rule(rule.id))
    assert {(lock.did, lock.state, lock.size) for lock in locks} == {
        (d, LockState.REPLICATING, size) for d, (size, _) in world.files.items()}
    for did in world.files:
        assert [r.id for r in world.catalogue.file_rules(did)] == [rule.id]


def test_a_removed_rule_is_not_found_and_covers_nothing(world: World) -> None:
    did = next(iter(world.files))
    rule, _ = _add_rule(world, did)
    world.remove_rule(rule.id)
    with pytest.raises(NotFoundError):
        world.catalogue.get_rule(rule.id)
    assert world.catalogue.file_rules(did) == []
