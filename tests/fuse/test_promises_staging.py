"""Rule staging promises of docs/SEMANTICS.md against the real lake (the unit tests use the fake
catalogue): rule states as Rucio gives them, a rule deleted under a waiting open, concurrent opens,
the local replica's size check, and auto mode without a streamable replica."""

from __future__ import annotations

import errno
import os
import re
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo import seed
from datalakefs.demo.status import LakeStatus
from tests.fuse.test_staging import NewMount, SetKnobs, expected, fresh_dataset, path_of, rules_on, state_of
from tests.fuse.waiting import wait_until

pytestmark = [pytest.mark.lake, pytest.mark.fuse]


def remove_rule(client: Any, rule_id: str) -> None:
    """Expire the rule now: Rucio's judge-cleaner then removes it (a `delete-rule` waits an hour)."""
    client.update_replication_rule(rule_id, {"lifetime": 0})


def nonblocking_open_state(path: Path) -> str:
    """``open(O_NONBLOCK)`` of a file still being staged: EAGAIN, and the state line it leaves."""
    with pytest.raises(BlockingIOError) as caught:
        os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    assert caught.value.errno == errno.EAGAIN
    return state_of(path)


def test_waiting_approval_is_waited_for_and_the_approved_rule_stages(
    lake: LakeStatus, rucio_client: Any, new_mount: NewMount, fts_knobs: SetKnobs
) -> None:
    """A rule asking for approval has no locks yet, so no rule covers the file: the daemon's own
    rule is Rucio's DuplicateRule, resolved to the waiting one, never a second rule."""
    assert lake.seed is not None
    fts_knobs()
    plan = fresh_dataset(lake, rucio_client, (2000,))
    spec = plan.files[0]
    [rule_id] = rucio_client.add_replication_rule([{"scope": spec.scope, "name": spec.name}], 1,
                                                  lake.seed.scratch_rse, ask_approval=True, lifetime=3600)
    assert rucio_client.get_replication_rule(rule_id)["state"] == "WAITING_APPROVAL"
    mount = new_mount("staging=rule", "staging_timeout=120")
    mount.start()
    path = path_of(mount, plan, 0)
    assert nonblocking_open_state(path).startswith(f"rule {rule_id} WAITING_APPROVAL: 0/")
    rucio_client.approve_replication_rule(rule_id)
    assert path.read_bytes() == expected(lake, spec)  # a blocking open waits for the approved rule
    assert [r["id"] for r in rucio_client.list_did_rules(spec.scope, spec.name)] == [rule_id]
    assert mount.status()["staging"]["counters"].get("rules_created", 0) == 0


def test_a_suspended_rule_is_shown_as_suspended(
    lake: LakeStatus, rucio_client: Any, new_mount: NewMount, fts_knobs: SetKnobs
) -> None:
    assert lake.seed is not None
    fts_knobs(delay=600.0)  # the transfer is held: the rule stays unfinished while the test looks
    plan = fresh_dataset(lake, rucio_client, (2000,))
    spec = plan.files[0]
    [rule_id] = rucio_client.add_replication_rule([{"scope": spec.scope, "name": spec.name}], 1,
                                                  lake.seed.scratch_rse, lifetime=3600)
    try:
        mount = new_mount("staging=rule", "staging_timeout=120")
        mount.start()
        path = path_of(mount, plan, 0)
        assert nonblocking_open_state(path).startswith(f"rule {rule_id} REPLICATING: 0/1 locks OK")
        rucio_client.update_replication_rule(rule_id, {"state": "SUSPENDED"})
        wait_until(lambda: nonblocking_open_state(path).startswith(f"rule {rule_id} SUSPENDED: 0/1 locks OK"),
                   timeout=60, what="the SUSPENDED state")
    finally:
        remove_rule(rucio_client, rule_id)


def test_a_rule_removed_under_a_waiting_open_ends_the_wait_and_the_next_open_makes_a_new_one(
    lake: LakeStatus, rucio_client: Any, new_mount: NewMount, fts_knobs: SetKnobs
) -> None:
    """Rucio's `delete-rule` is soft (the rule expires within the hour); the rule disappears when its
    judge-cleaner removes it once expired, which a lifetime of 0 brings about at once."""
    assert lake.seed is not None
    fts_knobs(delay=600.0)
    plan = fresh_dataset(lake, rucio_client, (2000,))
    spec = plan.files[0]
    mount = new_mount("staging=rule", "staging_timeout=3600")  # only the removal can end the wait
    mount.start()
    path = path_of(mount, plan, 0)
    outcome: list[OSError | bytes] = []

    def blocking_open() -> None:
        try:
            outcome.append(path.read_bytes())
        except OSError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=blocking_open)
    reader.start()
    try:
        [first] = wait_until(lambda: rules_on(rucio_client, spec, lake.seed.scratch_rse), timeout=60,
                             what="the open's rule")
        remove_rule(rucio_client, first["id"])
    finally:
        reader.join(timeout=120)
    assert outcome, "the open still waits on a rule that is gone"
    [gone] = outcome
    assert isinstance(gone, OSError) and gone.errno == errno.EAGAIN, gone
    nonblocking_open_state(path)  # the next open looks again: a new rule
    rules = rules_on(rucio_client, spec, lake.seed.scratch_rse)
    assert [r["id"] for r in rules] != [first["id"]] and len(rules) == 1, rules
    [second] = rules
    remove_rule(rucio_client, second["id"])


def test_concurrent_opens_make_one_rule(
    lake: LakeStatus, rucio_client: Any, new_mount: NewMount, fts_knobs: SetKnobs
) -> None:
    assert lake.seed is not None
    fts_knobs(delay=3.0)
    plan = fresh_dataset(lake, rucio_client, (5000,))
    mount = new_mount("staging=rule", "staging_timeout=120")
    mount.start()
    path = path_of(mount, plan, 0)
    start = threading.Barrier(6)
    read: list[bytes] = []

    def reader() -> None:
        start.wait(timeout=30)
        read.append(path.read_bytes())

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert read == [expected(lake, plan.files[0])] * 6
    assert len(rules_on(rucio_client, plan.files[0], lake.seed.scratch_rse)) == 1
    assert mount.status()["staging"]["counters"]["rules_created"] == 1


def test_a_local_replica_of_the_wrong_size_is_read_over_http(
    lake: LakeStatus, rucio_client: Any, new_mount: NewMount, fts_knobs: SetKnobs, tmp_path: Path
) -> None:
    """``staging_local_paths`` points the staged replica's PFNs at a directory where the file has
    the wrong size: the daemon notices and reads the replica over HTTP, right bytes."""
    assert lake.seed is not None
    fts_knobs()
    plan = fresh_dataset(lake, rucio_client, (3000,))
    spec = plan.files[0]
    [rule_id] = rucio_client.add_replication_rule([{"scope": spec.scope, "name": spec.name}], 1,
                                                  lake.seed.scratch_rse, lifetime=3600)
    wait_until(lambda: rucio_client.get_replication_rule(rule_id)["state"] == "OK", timeout=120,
               what="the rule to be OK")
    scratch = Path(lake.paths["scratch"])
    decoy = tmp_path / "decoy"
    wrong = decoy / seed.rse_file(scratch, spec.scope, spec.name).relative_to(scratch)
    wrong.parent.mkdir(parents=True)
    wrong.write_bytes(b"short")
    prefixes = [m.partition("=")[0] for m in tomllib.loads(lake.datalakefs_config.read_text())["staging_local_paths"]]
    decoys = ", ".join(f'"{prefix}={decoy}/"' for prefix in prefixes)
    config = tmp_path / "datalakefs.toml"
    config.write_text(re.sub(r"(?m)^staging_local_paths = .*$", f"staging_local_paths = [{decoys}]",
                             lake.datalakefs_config.read_text()))
    mount = new_mount("staging=rule", "xcache=none", config=config)
    mount.start()
    path = path_of(mount, plan, 0)
    assert path.read_bytes() == expected(lake, spec)
    reads = mount.status()["staging"]["reads"]
    assert reads.get("local_opens", 0) == 0 and reads["staged_http_opens"] == 1
    assert mount.status()["content"]["bytes_fetched"] == spec.size
    assert f"{wrong} has the wrong size" in mount.daemon_log()


def test_auto_mode_stages_by_rule_when_no_replica_streams(
    lake: LakeStatus, rucio_client: Any, new_mount: NewMount, fts_knobs: SetKnobs
) -> None:
    """Without an XCache, a file whose replicas are all root:// (read_schemes=root) has nothing to
    stream: auto mode's open makes a rule and waits for it, as rule mode does. (Its read stops
    there: with read_schemes=root the staged replica on SCRATCH, which has no root:// door, has no
    readable URL either.)"""
    assert lake.seed is not None
    fts_knobs(delay=600.0)  # held: the open finds the rule replicating
    plan = fresh_dataset(lake, rucio_client, (4000,))
    spec = plan.files[0]
    mount = new_mount("staging=auto", "xcache=none", "read_schemes=root")
    mount.start()
    path = path_of(mount, plan, 0)
    try:
        state = nonblocking_open_state(path)
        [rule] = rules_on(rucio_client, spec, lake.seed.scratch_rse)
        assert state.startswith(f"rule {rule['id']} REPLICATING: 0/1 locks OK"), state
        staging = mount.status()["staging"]
        assert staging["counters"]["rules_created"] == 1
        assert staging["reads"].get("hybrid_opens", 0) == 0  # not streamed
    finally:
        for rule in rules_on(rucio_client, spec, lake.seed.scratch_rse):
            remove_rule(rucio_client, rule["id"])
