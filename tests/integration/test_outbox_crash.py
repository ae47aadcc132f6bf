"""Crash safety of the outbox: SIGKILL the daemon at random moments and once at each journal and
upload transition while files are written and uploaded; after the last restart every file whose
``close()`` succeeded is registered exactly once, with the right size and adler32, AVAILABLE on the
upload RSE with its bytes there, attached to its dataset and kept by exactly one rule there (the
dataset's); nothing is left COPYING (SPEC §5).

The default run is small (``make test``); ``DATALAKEFS_SOAK=1`` (``make soak``) runs
``DATALAKEFS_SOAK_KILLS`` random kills (default 1,000) over at least ``DATALAKEFS_SOAK_FILES`` files
(default 10,000) and prints the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from datalakefs.cli.common import registry_file
from datalakefs.demo.status import LakeStatus
from datalakefs.fuse.session import is_stale, unmount, wait_gone
from datalakefs.outbox.journal import KILL_AT_ENV
from tests.fuse.mounting import Mount

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

SOAK = os.environ.get("DATALAKEFS_SOAK") == "1"
RANDOM_KILLS = int(os.environ.get("DATALAKEFS_SOAK_KILLS", "1000")) if SOAK else 3
MIN_FILES = int(os.environ.get("DATALAKEFS_SOAK_FILES", "10000")) if SOAK else 0
BLOCK = 1 << 20
#: 0 B, 1 B, block size ± 1, and (rarely, it costs time) tens of MiB
SIZES = (0, 1, BLOCK - 1, BLOCK, BLOCK + 1)
BIG = 24 << 20
#: every named transition of journal.py and rucio_upload.py, each killed at once
TRANSITIONS = ("commit", "upload-streamed", "uploading", "upload-stored", "upload-registered", "upload-attached",
               "done")


@dataclass
class Ledger:
    """What the writers attempted and which closes succeeded (name → (size, adler32))."""

    acked: dict[str, tuple[int, str]] = field(default_factory=dict)
    attempted: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _write_files(directory: Path, ledger: Ledger, stop: threading.Event, rng: random.Random,
                 big_every: int) -> None:
    """Write files until ``stop`` or the first error (the daemon died under us)."""
    count = 0
    while not stop.is_set():
        count += 1
        size = BIG if big_every and count % big_every == 0 else rng.choice(SIZES)
        name = f"f_{secrets.token_hex(8)}"
        data = rng.randbytes(size)
        with ledger.lock:
            ledger.attempted.add(name)
        try:
            with open(directory / name, "wb") as fh:
                for start in range(0, size, BLOCK):
                    fh.write(data[start : start + BLOCK])
        except OSError:
            return
        with ledger.lock:
            ledger.acked[name] = (size, f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")


def _daemon_pid(state_dir: Path, mountpoint: Path) -> int:
    """From the mount registry, not status.json: a daemon told to die at a transition may already be
    dead (resumed uploads reach the transition at once)."""
    return int(json.loads(registry_file(state_dir, str(mountpoint)).read_text())["pid"])




@contextlib.contextmanager
def _writer(directory: Path, ledger: Ledger, rng: random.Random, big_every: int) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=_write_files, args=(directory, ledger, stop, rng, big_every), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=300)


def _outbox_left(mount: Mount) -> int:
    """Files still in the outbox (none may have failed)."""
    document = json.loads((mount.mountpoint / ".datalakefs" / "outbox.json").read_text())
    failed = [f for f in document["files"] if f["state"] == "failed"]
    assert not failed, failed
    return len(document["files"])


def test_kills_lose_nothing_and_duplicate_nothing(lake: LakeStatus, tmp_path: Path, rucio_client: Any) -> None:
    assert lake.seed is not None
    scope, rse = lake.seed.upload_scope, lake.seed.scratch_rse
    dataset = f"crash_{secrets.token_hex(6)}"
    ca_bundle = lake.datalakefs_config.parent / "dav.crt"
    options = (f"cache_dir={tmp_path / 'cache'}", f"state_dir={tmp_path / 'state'}",
               f"storage_ca_bundle={ca_bundle}", "upload_concurrency=4",
               "upload_while_writing=512K")  # files from 512 KiB on are sent while they are written
    mountpoint = tmp_path / "lake"
    rng = random.Random(int(os.environ.get("DATALAKEFS_CRASH_SEED", "7")))
    ledger = Ledger()
    kills = 0

    def mount(kill_at: str | None = None) -> Mount:
        env = {**os.environ, KILL_AT_ENV: kill_at} if kill_at else None
        if is_stale(str(mountpoint)):  # left by a kill (Mount() itself must be able to stat it)
            unmount(str(mountpoint), lazy=True)
        started = Mount(mountpoint, lake.datalakefs_config, *options, env=env)
        started.start()
        return started

    current = mount()
    directory = mountpoint / ".outbox" / scope / dataset
    directory.mkdir()
    try:
        for transition in TRANSITIONS:
            current.stop()
            try:
                current = mount(kill_at=transition)
            except AssertionError:
                pass  # resumed uploads reached the transition before the mount was ready: killed there
            else:
                pid = _daemon_pid(tmp_path / "state", mountpoint)
                with _writer(directory, ledger, rng, big_every=0):
                    assert wait_gone(pid, timeout=120), f"the daemon never reached {transition}"
            kills += 1
            current = mount()
        rounds = 0
        while rounds < RANDOM_KILLS or len(ledger.attempted) < MIN_FILES:
            rounds += 1
            pid = _daemon_pid(tmp_path / "state", mountpoint)
            with _writer(directory, ledger, rng, big_every=0 if SOAK and rounds % 20 else 3):
                time.sleep(rng.uniform(0.05, 0.6 if SOAK else 2.0))
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid, timeout=120)
            kills += 1
            current = mount()
            if SOAK and rounds % 50 == 0:
                print(f"[outbox soak] kills={kills} attempted={len(ledger.attempted)} acked={len(ledger.acked)}",
                      flush=True)
        # the last daemon finishes everything
        # a soak leaves thousands queued: wait as long as uploads keep finishing, not a fixed time
        left, progressed = _outbox_left(current), time.monotonic()
        while left:
            assert time.monotonic() - progressed < 300, f"uploads stopped finishing with {left} left"
            time.sleep(0.5)
            now_left = _outbox_left(current)
            if now_left < left:
                progressed = time.monotonic()
            left = now_left
    finally:
        current.stop()

    _check_lake(rucio_client, scope, dataset, rse, ca_bundle, ledger)
    print(f"\n[outbox crash] kills={kills} files attempted={len(ledger.attempted)} "
          f"acknowledged={len(ledger.acked)} lost=0 duplicated=0 copying=0")
    # checked: hand the bytes to Rucio's reaper (a soak writes tens of GB into the shared test lake)
    for rule in rucio_client.list_did_rules(scope, dataset):
        rucio_client.delete_replication_rule(rule["id"], purge_replicas=True)


def _check_lake(client: Any, scope: str, dataset: str, rse: str, ca_bundle: Path, ledger: Ledger) -> None:
    content = [row["name"] for row in client.list_content(scope, dataset)]
    assert len(content) == len(set(content)), "a file is attached twice"
    assert set(content) <= ledger.attempted, "a file nobody wrote is in the dataset"
    missing = set(ledger.acked) - set(content)
    assert not missing, f"{len(missing)} acknowledged files lost: {sorted(missing)[:5]}"
    # the dataset's rule on the upload RSE keeps every file: wait for Rucio's judge-evaluator to
    # give each its lock (a file needs no rule of its own; one would show below as a second rule)
    (rule,) = [r for r in client.list_did_rules(scope, dataset) if r["rse_expression"] == rse]
    deadline = time.monotonic() + 900
    while unlocked := set(content) - {lock["name"] for lock in client.list_replica_locks(rule["id"])
                                      if lock["state"] == "OK"}:
        assert time.monotonic() < deadline, f"{len(unlocked)} files never got their lock: {sorted(unlocked)[:5]}"
        time.sleep(2)
    dids = [{"scope": scope, "name": name} for name in content]
    replicas = {}
    for start in range(0, len(dids), 500):
        for row in client.list_replicas(dids[start : start + 500], all_states=True, schemes=["https"]):
            replicas[row["name"]] = row
    for name in content:
        row = replicas[name]
        assert row["states"] == {rse: "AVAILABLE"}, (name, row["states"])
        if name in ledger.acked:
            assert (row["bytes"], row["adler32"]) == ledger.acked[name], name
        rules = [r for r in client.list_associated_rules_for_file(scope, name) if r["rse_expression"] == rse]
        assert len(rules) == 1, (name, rules)
        pfn = next(iter(row["pfns"]))
        stored = requests.get(pfn, verify=str(ca_bundle), timeout=60)
        assert stored.status_code == 200 and len(stored.content) == row["bytes"], name
        assert f"{zlib.adler32(stored.content) & 0xFFFFFFFF:08x}" == row["adler32"], name
