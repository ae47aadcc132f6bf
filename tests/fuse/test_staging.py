"""Rule staging, dataset prefetch and the hybrid read path through real mounts of the test lake.

Each test stages datasets of its own (``fresh_dataset``: files only on LAKE-ORIGIN), so a rule really
has to move bytes through the FTS shim; the shim's knobs make transfers slow or fail.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo import seed
from datalakefs.demo.lake import Lake
from datalakefs.demo.status import LakeStatus
from tests.fuse.mounting import Mount

NewMount = Callable[..., Mount]
SetKnobs = Callable[..., None]
STATE = "user.datalakefs.state"


def fresh_dataset(lake: LakeStatus, client: Any, sizes: tuple[int, ...]) -> seed.DatasetPlan:
    assert lake.seed is not None
    scope = lake.seed.upload_scope
    name = f"staging_{uuid.uuid4().hex[:10]}"
    plan = seed.DatasetPlan(
        scope, name, tuple(seed.FileSpec(scope, f"{name}.f{i}.bin", size) for i, size in enumerate(sizes))
    )
    seed.add_origin_dataset(client, Lake(lake.state_dir), plan)
    return plan


def expected(lake: LakeStatus, spec: seed.FileSpec, offset: int = 0, length: int | None = None) -> bytes:
    assert lake.seed is not None
    return seed.content(lake.seed.content_key, spec.did, spec.size, offset, length)


def path_of(mount: Mount, plan: seed.DatasetPlan, index: int) -> Path:
    return mount.mountpoint / plan.scope / plan.name / plan.files[index].name


def state_of(path: Path) -> str:
    return os.getxattr(path, STATE).decode()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s", pytrace=False)
        time.sleep(0.2)


def rules_on(client: Any, spec: seed.FileSpec, rse: str) -> list[dict[str, Any]]:
    return [r for r in client.list_associated_rules_for_file(spec.scope, spec.name) if r["rse_expression"] == rse]


def test_rule_open_blocks_until_the_lock_is_ok_and_nonblocking_gets_eagain(
    lake: LakeStatus, rucio_client: Any, new_mount: NewMount, fts_knobs: SetKnobs
) -> None:
    assert lake.seed is not None
    plan = fresh_dataset(lake, rucio_client, (300_000,))
    fts_knobs(delay=4.0)
    mount = new_mount("staging=rule", "staging_timeout=120")
    mount.start()
    path = path_of(mount, plan, 0)
    with pytest.raises(BlockingIOError) as caught:
        os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    assert caught.value.errno == errno.EAGAIN
    assert re.match(r"rule \w+ REPLICATING: 0/1 locks OK", state_of(path)), state_of(path)

    opened: list[bytes] = []
    seen_while_blocked: list[str] = []

    def blocking_open() -> None:
        with open(path, "rb") as fh:
            opened.append(fh.read())

    reader = threading.Thread(target=blocking_open)
    reader.start()
    while reader.is_alive() and not seen_while_blocked:
        with pytest.raises(BlockingIOError):
            os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        seen_while_blocked.append(state_of(path))
    reader.join(timeout=120)
    assert not reader.is_alive()
    assert opened == [expected(lake, plan.files[0])]
    assert seen_while_blocked and "REPLICATING" in seen_while_blocked[0]
    assert re.match(r"rule \w+ OK: 1/1 locks OK; staged on SCRATCH", state_of(path)), state_of(path)

    # a second open reuses what is there: still exactly one rule, read from SCRATCH's local directory
    with open(path, "rb") as fh:
        assert fh.read(10) == expected(lake, plan.files[0], 0, 10)
    assert len(rules_on(rucio_client, plan.files[0], lake.seed.scratch_rse)) == 1
    staging = mount.status()["staging"]
    assert staging["counters"]["rules_created"] == 1
    assert staging["reads"]["local_opens"] >= 1 and staging["reads"]["local_bytes"] >= plan.files[0].size
    assert staging["files"][0]["state"] == "OK" and staging["files"][0]["locks_ok"] == 1


def test_a_failing_transfer_gives_eio_with_the_reason(
    lake: LakeStatus, rucio_client: Any, new_mount: NewMount, fts_knobs: SetKnobs
) -> None:
    plan = fresh_dataset(lake, rucio_client, (1000,))
    fts_knobs(fail=re.escape(plan.files[0].name))
    mount = new_mount("staging=rule", "staging_timeout=120")
    mount.start()
    path = path_of(mount, plan, 0)
    with pytest.raises(OSError) as caught:
        path.read_bytes()
    assert caught.value.errno == errno.EIO
    state = state_of(path)
    assert "STUCK" in state and "forced failure by fts-shim" in state, state
    with pytest.raises(OSError) as again:  # at once, from the known state
        os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    assert again.value.errno == errno.EIO
    rules = mount.status()["staging"]["active_rules"]
    assert [r["state"] for r in rules] == ["STUCK"] and "forced failure" in rules[0]["error"]


def stage_cli(lake: LakeStatus, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "datalakefs", "stage", "--config", str(lake.datalakefs_config),
                           *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_stage_cli_prefetches_a_dataset(lake: LakeStatus, rucio_client: Any, fts_knobs: SetKnobs) -> None:
    fts_knobs()
    plan = fresh_dataset(lake, rucio_client, (1000, 2000, 3000, 4000))
    did = f"{plan.scope}:{plan.name}"
    done = stage_cli(lake, did, "--wait", "--timeout", "240")
    assert done.returncode == 0, done.stderr
    assert "created rule" in done.stdout and "OK: 4/4 locks OK" in done.stdout
    assert "4/4 locks OK, 9.8 KiB of 9.8 KiB, OK" in done.stderr
    locks = list(rucio_client.list_replica_locks(done.stdout.split()[2].rstrip(":")))
    assert len(locks) == 4 and {lock["state"] for lock in locks} == {"OK"}
    again = stage_cli(lake, did)
    assert again.returncode == 0 and "reusing rule" in again.stdout


def test_stage_cli_reports_a_stuck_rule(lake: LakeStatus, rucio_client: Any, fts_knobs: SetKnobs) -> None:
    plan = fresh_dataset(lake, rucio_client, (1000, 1000))
    fts_knobs(fail=re.escape(plan.files[1].name))
    done = stage_cli(lake, f"{plan.scope}:{plan.name}", "--wait", "--timeout", "240")
    assert done.returncode == 1
    assert "STUCK" in done.stderr and "forced failure by fts-shim" in done.stderr


def test_stage_xattr_makes_one_rule_for_a_directory(
    lake: LakeStatus, rucio_client: Any, new_mount: NewMount, fts_knobs: SetKnobs
) -> None:
    fts_knobs()
    plan = fresh_dataset(lake, rucio_client, (1000, 2000))
    mount = new_mount()  # stream mode: staging on request works in every mode
    mount.start()
    directory = mount.mountpoint / plan.scope / plan.name
    os.setxattr(directory, "user.datalakefs.stage", b"1")
    os.setxattr(directory, "user.datalakefs.stage", b"1")
    rules = list(rucio_client.list_did_rules(plan.scope, plan.name))
    assert len(rules) == 1
    wait_until(lambda: state_of(directory).startswith(f"rule {rules[0]['id']} OK: 2/2 locks OK"), 120,
               "the dataset rule turns OK")
    status = mount.status()["staging"]
    assert status["collections"][0]["rule_id"] == rules[0]["id"]
    by_path = stage_cli(lake, str(directory), "--wait")  # a path under the mount names its DID
    assert by_path.returncode == 0 and f"reusing rule {rules[0]['id']}" in by_path.stdout
    with pytest.raises(OSError) as caught:
        os.setxattr(directory, "user.other", b"1")
    assert caught.value.errno == errno.EROFS


def test_hybrid_streams_first_then_reads_the_staged_local_replica(
    lake: LakeStatus, rucio_client: Any, new_mount: NewMount, fts_knobs: SetKnobs
) -> None:
    assert lake.seed is not None
    size = 8 << 20
    plan = fresh_dataset(lake, rucio_client, (size,))
    spec = plan.files[0]
    fts_knobs(delay=6.0)
    rucio_client.add_replication_rule([{"scope": plan.scope, "name": plan.name}], 1, lake.seed.scratch_rse,
                                      lifetime=3600)
    mount = new_mount("staging=auto")
    mount.start()
    path = path_of(mount, plan, 0)
    with open(path, "rb", buffering=0) as fh:
        assert fh.read(4096) == expected(lake, spec, 0, 4096)
        first = mount.status()
        assert first["staging"]["reads"]["hybrid_opens"] == 1
        assert first["staging"]["reads"]["hybrid_streamed_reads"] >= 1
        assert first["content"]["requests"] >= 1  # streamed over HTTP
        wait_until(lambda: "OK" in state_of(path).split(":")[0], 120, "the file's lock turns OK")
        wait_until(lambda: "staged on SCRATCH" in state_of(path), 30, "the daemon sees the staged replica")
        fh.seek(size - 4096)
        assert fh.read(4096) == expected(lake, spec, size - 4096, 4096)
    status = mount.status()["staging"]
    assert status["counters"]["followed_while_copying"] == 1
    reads = status["reads"]
    assert reads["hybrid_switches"] == 1
    assert reads["hybrid_staged_reads"] >= 1 and reads["local_reads"] >= 1


def test_stage_cli_prefetches_the_10k_dataset(lake: LakeStatus, rucio_client: Any, fts_knobs: SetKnobs) -> None:
    """The issue's dataset prefetch: every one of 10,000 locks OK. The first run on a new lake takes
    tens of minutes (Rucio's conveyor moves ~1,000 requests per pass here); the rule then stays, so
    later runs on the same lake reuse it and return at once."""
    assert lake.seed is not None
    fts_knobs()
    done = stage_cli(lake, lake.seed.dataset_10k, "--wait", "--timeout", "3600", timeout=3700)
    assert done.returncode == 0, done.stderr
    assert "OK: 10000/10000 locks OK" in done.stdout
    rule_id = done.stdout.split()[2].rstrip(":")
    locks = list(rucio_client.list_replica_locks(rule_id))
    assert len(locks) == 10000 and {lock["state"] for lock in locks} == {"OK"}
