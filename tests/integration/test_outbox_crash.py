"""Crash safety of the outbox: SIGKILL the daemon once at each journal and upload transition, then at
transitions drawn from a seeded random generator, while files are written, rewritten, appended to
and truncated, and uploaded. After the last restart every name holds, in the lake, exactly its last
acknowledged version (or a later version whose close() the kill interrupted): registered once, with
that size and adler32, AVAILABLE on the upload RSE with its bytes there, attached to its dataset and
kept by exactly one rule there (the dataset's); nothing is left COPYING, no name was registered
outside the dataset, and an unregistered object on the storage is only ever the partial transfer of
a file sent while it was written (SPEC §5).

Each kill is the daemon's own (``DATALAKEFS_TEST_KILL_AT=<transition>:<n>``): it writes the
transition to a mark file and SIGKILLs itself at the n-th time it reaches it, so the test knows it
died where intended, and a run is reproducible from its seed (``DATALAKEFS_CRASH_SEED``), not from
wall-clock sleeps.

The default run is small (``make test``); ``DATALAKEFS_SOAK=1`` (``make soak``) runs
``DATALAKEFS_SOAK_KILLS`` random kills (default 1,000) over at least ``DATALAKEFS_SOAK_FILES`` files
(default 10,000) and prints the figures.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import secrets
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from datalakefs.catalogue.upload import KILL_AT_ENV, KILL_MARK_ENV
from datalakefs.cli.common import registry_file
from datalakefs.demo.status import LakeStatus
from datalakefs.fuse.session import is_stale, unmount, wait_gone
from tests.fuse.mounting import Mount

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

SOAK = os.environ.get("DATALAKEFS_SOAK") == "1"
RANDOM_KILLS = int(os.environ.get("DATALAKEFS_SOAK_KILLS", "1000")) if SOAK else 4
MIN_FILES = int(os.environ.get("DATALAKEFS_SOAK_FILES", "10000")) if SOAK else 0
BLOCK = 1 << 20
EARLY = 512 << 10  # upload_while_writing of the mounts below
#: 0 B, 1 B, block size ± 1 (past EARLY: sent while written)
SIZES = (0, 1, 1000, BLOCK - 1, BLOCK, BLOCK + 1)
BIG = 24 << 20
#: every named transition (outbox/service.py, outbox/uploads.py, catalogue/rucio_upload.py)
TRANSITIONS = ("commit", "published", "upload-streamed", "uploading", "upload-stored", "upload-registered",
               "upload-attached", "done")
#: how many times a random kill lets a transition pass before it kills (writers make ~10 commits/s)
OCCURRENCES = {"commit": 40, "published": 40}
DEADLINE = 180.0


def _adler32(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


@dataclass
class Ledger:
    """Per name, every version a writer tried to close, in order, and whether its close() returned
    success (acknowledged)."""

    versions: dict[str, list[tuple[int, str, bool]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attempt(self, name: str, data: bytes) -> int:
        with self.lock:
            versions = self.versions.setdefault(name, [])
            versions.append((len(data), _adler32(data), False))
            return len(versions) - 1

    def acknowledge(self, name: str, index: int) -> None:
        with self.lock:
            size, adler32, _ = self.versions[name][index]
            self.versions[name][index] = (size, adler32, True)

    def acknowledged(self) -> set[str]:
        return {name for name, versions in self.versions.items() if any(acked for *_, acked in versions)}

    def allowed(self, name: str) -> list[tuple[int, str]]:
        """What the lake may hold for ``name``: its last acknowledged version, or a later one whose
        close() was cut by a kill."""
        versions = self.versions[name]
        last = max((i for i, (*_, acked) in enumerate(versions) if acked), default=0)
        return [(size, adler32) for size, adler32, _ in versions[last:]]

    def count(self) -> tuple[int, int]:
        with self.lock:
            attempts = sum(len(v) for v in self.versions.values())
            acked = sum(1 for v in self.versions.values() for *_, a in v if a)
        return attempts, acked


def _write(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        for start in range(0, len(data), BLOCK):
            os.write(fd, data[start : start + BLOCK])
    finally:
        os.close(fd)


def _write_files(directory: Path, ledger: Ledger, stop: threading.Event, rng: random.Random, big_every: int) -> None:
    """Write new files, and rewrite, append to and truncate the ones just written, until ``stop`` or
    the daemon dies. A change of an existing name opens it without O_CREAT: a name that left the
    outbox (uploaded) is ENOENT, one being uploaded EBUSY, and neither change is acknowledged."""
    count = 0
    previous: tuple[str, bytes] | None = None
    while not stop.is_set():
        count += 1
        action = rng.choice(("new", "new", "new", "rewrite", "append", "truncate", "pwrite"))
        try:
            if previous is None or action == "new":
                size = BIG if big_every and count % big_every == 0 else rng.choice(SIZES)
                name, data = f"f_{secrets.token_hex(8)}", rng.randbytes(size)
                index = ledger.attempt(name, data)
                _write(directory / name, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            else:
                name, old = previous
                if action == "rewrite":
                    data = rng.randbytes(rng.choice(SIZES))
                    index = ledger.attempt(name, data)
                    _write(directory / name, data, os.O_WRONLY | os.O_TRUNC)
                elif action == "append":
                    extra = rng.randbytes(rng.choice(SIZES[:3]))
                    data = old + extra
                    index = ledger.attempt(name, data)
                    _write(directory / name, extra, os.O_WRONLY | os.O_APPEND)
                else:
                    cut = rng.randrange(len(old) + 1)
                    patch = rng.randbytes(10) if action == "pwrite" else b""
                    data = old[:cut] + patch + old[cut + len(patch):] if patch else old[:cut]
                    index = ledger.attempt(name, data)
                    fd = os.open(directory / name, os.O_WRONLY)
                    try:
                        if patch:
                            os.pwrite(fd, patch, cut)
                        else:
                            os.ftruncate(fd, cut)
                    finally:
                        os.close(fd)
        except FileNotFoundError:
            previous = None  # uploaded meanwhile
            continue
        except OSError as exc:
            if exc.errno == errno.EBUSY:  # being uploaded
                previous = None
                continue
            return  # the daemon died under us
        ledger.acknowledge(name, index)
        previous = (name, data)


def _daemon_pid(state_dir: Path, mountpoint: Path) -> int:
    """From the mount registry, not status.json: a daemon told to die at a transition may already be
    dead (resumed uploads reach the transition at once)."""
    return int(json.loads(registry_file(state_dir, str(mountpoint)).read_text())["pid"])


@contextlib.contextmanager
def _writer(directory: Path, ledger: Ledger, rng: random.Random, big_every: int) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=_write_files, args=(directory, ledger, stop, random.Random(rng.random()),
                                                         big_every), daemon=True)
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
               f"storage_ca_bundle={ca_bundle}", "upload_concurrency=4", f"upload_while_writing={EARLY}")
    mountpoint = tmp_path / "lake"
    seed = int(os.environ.get("DATALAKEFS_CRASH_SEED", "7"))
    rng = random.Random(seed)
    ledger = Ledger()
    mark = tmp_path / "killed-at"
    kills = 0

    def mount(kill_at: str | None = None) -> Mount | None:
        """A mount (None when its daemon reached its kill point before the mount was ready)."""
        env = {**os.environ, KILL_AT_ENV: kill_at, KILL_MARK_ENV: str(mark)} if kill_at else None
        if is_stale(str(mountpoint)):  # left by a kill (Mount() itself must be able to stat it)
            unmount(str(mountpoint), lazy=True)
        started = Mount(mountpoint, lake.datalakefs_config, *options, env=env)
        try:
            started.start()
        except AssertionError:
            if kill_at is None or not mark.exists():
                raise
            return None  # resumed uploads reached the transition at once: checked by the caller
        return started

    def kill_at(point: str) -> None:
        """Mount with the daemon told to die at ``point``, write until it does, check where it did."""
        nonlocal kills
        transition = point.partition(":")[0]
        mark.unlink(missing_ok=True)
        killed = mount(kill_at=point)
        if killed is not None:
            pid = _daemon_pid(tmp_path / "state", mountpoint)
            big_every = 0 if SOAK and kills % 20 else 3
            with _writer(directory, ledger, rng, big_every):
                assert wait_gone(pid, timeout=DEADLINE), f"the daemon never reached {point}"
        assert mark.read_text() == transition, f"the daemon died elsewhere than at {point}"
        kills += 1

    current = mount()
    assert current is not None
    directory = mountpoint / ".outbox" / scope / dataset
    directory.mkdir()
    try:
        current.stop()
        for transition in TRANSITIONS:
            kill_at(transition)
        rounds = 0
        while rounds < RANDOM_KILLS or ledger.count()[0] < MIN_FILES:
            rounds += 1
            transition = rng.choice(TRANSITIONS)
            kill_at(f"{transition}:{rng.randint(1, OCCURRENCES.get(transition, 3))}")
            if SOAK and rounds % 50 == 0:
                attempts, acked = ledger.count()
                print(f"[outbox soak] seed={seed} kills={kills} versions attempted={attempts} acked={acked}",
                      flush=True)
        # the last daemon finishes everything
        current = mount()
        assert current is not None
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
        if current is not None:
            current.stop()

    orphans = _check_lake(rucio_client, scope, dataset, rse, ca_bundle, ledger)
    attempts, acked = ledger.count()
    print(f"\n[outbox crash] seed={seed} kills={kills} names={len(ledger.versions)} versions attempted={attempts} "
          f"acknowledged={acked} lost=0 wrong=0 duplicated=0 copying=0 partial-objects={orphans}")
    # checked: hand the bytes to Rucio's reaper (a soak writes tens of GB into the shared test lake)
    for rule in rucio_client.list_did_rules(scope, dataset):
        rucio_client.delete_replication_rule(rule["id"], purge_replicas=True)


def _check_lake(client: Any, scope: str, dataset: str, rse: str, ca_bundle: Path, ledger: Ledger) -> int:
    """Check the lake against the ledger; returns how many unregistered objects the storage holds."""
    content = [row["name"] for row in client.list_content(scope, dataset)]
    assert len(content) == len(set(content)), "a file is attached twice"
    assert set(content) <= ledger.versions.keys(), "a file nobody wrote is in the dataset"
    missing = ledger.acknowledged() - set(content)
    assert not missing, f"{len(missing)} acknowledged files lost: {sorted(missing)[:5]}"
    elsewhere = set()
    names = sorted(ledger.versions.keys() - set(content))
    for start in range(0, len(names), 500):
        dids = [{"scope": scope, "name": name} for name in names[start : start + 500]]
        with contextlib.suppress(Exception):  # DataIdentifierNotFound when none exists
            elsewhere.update(row["name"] for row in client.get_metadata_bulk(dids))
    assert not elsewhere, f"registered outside the dataset: {sorted(elsewhere)[:5]}"
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
    session = requests.Session()
    for name in content:
        row = replicas[name]
        assert row["states"] == {rse: "AVAILABLE"}, (name, row["states"])
        assert (row["bytes"], row["adler32"]) in ledger.allowed(name), (name, row["bytes"], row["adler32"])
        rules = [r for r in client.list_associated_rules_for_file(scope, name) if r["rse_expression"] == rse]
        assert len(rules) == 1, (name, rules)
        pfn = next(iter(row["pfns"]))
        stored = session.get(pfn, verify=str(ca_bundle), timeout=60)
        assert stored.status_code == 200 and len(stored.content) == row["bytes"], name
        assert _adler32(stored.content) == row["adler32"], name
    # objects at the storage path of names that are not registered: only a file sent while it was
    # written (past upload_while_writing, never acknowledged) may leave one
    orphans = 0
    for start in range(0, len(names), 50):
        batch = names[start : start + 50]
        pfns = client.lfns2pfns(rse, [f"{scope}:{name}" for name in batch], operation="write", scheme="https")
        for name in batch:
            if session.head(pfns[f"{scope}:{name}"], verify=str(ca_bundle), timeout=60).status_code == 200:
                orphans += 1
                assert name not in ledger.acknowledged(), f"an acknowledged file's object is unregistered: {name}"
                assert max(size for size, _ in ledger.allowed(name)) >= EARLY, f"a partial object of {name}"
    return orphans
