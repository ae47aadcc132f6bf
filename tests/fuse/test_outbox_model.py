"""A real mount's outbox against a reference model (hypothesis): the model is "the last acknowledged
content of each name" (docs/SEMANTICS.md's outbox table).

The machine opens (with or without ``O_TRUNC``/``O_APPEND``), writes, pwrites, truncates, fsyncs,
closes, renames and removes a few names in one dataset directory, and SIGKILLs and remounts the
daemon. Reads through the mount must always give the model's current bytes. Every run has its own
dataset directory in one mount that uploads to an RSE that does not exist, so nothing leaves the
outbox while the machines run; then the mount is remounted with the real RSE, the outbox drains, and
the lake must hold exactly the last acknowledged content of every name of every run (temporary
``.`` names stay, and are never uploaded).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from datalakefs.cli.common import registry_file
from datalakefs.demo.status import LakeStatus
from datalakefs.fuse.session import is_stale, unmount, wait_gone
from tests.fuse.mounting import Mount

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

NAMES = st.sampled_from(["a.dat", "b.dat", ".c.tmp"])
CHUNKS = st.binary(min_size=0, max_size=3000) | st.builds(lambda n: b"z" * n, st.integers(0, 300_000))
OFFSETS = st.integers(0, 400_000)


@dataclass
class Opened:
    """An open descriptor of a name, and how it was opened."""

    fd: int
    append: bool


@dataclass
class Model:
    """Per name: its bytes now (what a read sees) and its last acknowledged content."""

    current: dict[str, bytearray] = field(default_factory=dict)
    acknowledged: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Expected:
    """What one run left: per dataset, the content each name must have in the lake, and the
    temporary names that must still wait in the outbox."""

    dataset: str
    uploads: dict[str, bytes]
    kept: set[str]


class SharedMount:
    """The one mount every run of the machine uses (remounted after each kill)."""

    def __init__(self, lake: LakeStatus, base: Path) -> None:
        self.lake, self.base = lake, base
        self.options = (f"cache_dir={base / 'cache'}", f"state_dir={base / 'state'}",
                        f"storage_ca_bundle={lake.datalakefs_config.parent / 'dav.crt'}")
        self.expected: list[Expected] = []
        self.mount = self.start("upload_rse=NO_SUCH_RSE")  # nothing leaves the outbox meanwhile

    def start(self, *options: str) -> Mount:
        mountpoint = self.base / "lake"
        if mountpoint.exists() and is_stale(str(mountpoint)):
            unmount(str(mountpoint), lazy=True)
        self.mount = Mount(mountpoint, self.lake.datalakefs_config, *self.options, *options)
        self.mount.start()
        return self.mount

    def kill_and_remount(self) -> None:
        pid = int(json.loads(registry_file(self.base / "state", str(self.mount.mountpoint)).read_text())["pid"])
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, timeout=60)
        self.start("upload_rse=NO_SUCH_RSE")


class OutboxMountMachine(RuleBasedStateMachine):
    def __init__(self, shared: SharedMount) -> None:
        super().__init__()
        assert shared.lake.seed is not None
        self.shared = shared
        self.scope, self.dataset = shared.lake.seed.upload_scope, f"model_{secrets.token_hex(5)}"
        self.directory.mkdir()
        self.model = Model()
        self.opened: dict[str, Opened] = {}
        self.prefix = secrets.token_hex(4)  # DID names are for ever: each run has its own
        self.kills = 0  # each costs a remount: at most two a run

    @initialize(name=st.sampled_from(["a.dat", "b.dat"]), chunk=CHUNKS)
    def committed_file(self, name: str, chunk: bytes) -> None:
        """Every run starts from a committed file: its versions are what the rules change."""
        self.path(name).write_bytes(chunk)
        self.model.current[name] = bytearray(chunk)
        self.model.acknowledged[name] = chunk

    @property
    def directory(self) -> Path:
        return self.shared.mount.mountpoint / ".outbox" / self.scope / self.dataset

    def real(self, name: str) -> str:
        """The file name of the model's ``name`` (temporary names keep their leading dot)."""
        return f".{self.prefix}{name}" if name.startswith(".") else f"{self.prefix}{name}"

    def path(self, name: str) -> Path:
        return self.directory / self.real(name)

    # -- rules -------------------------------------------------------------------------------

    @precondition(lambda self: len(self.opened) < 2)
    @rule(data=st.data(), truncate=st.booleans(), append=st.booleans())
    def open(self, data: st.DataObject, truncate: bool, append: bool) -> None:
        """Mostly a name that exists: reopening, O_TRUNC and O_APPEND of committed files are where
        versions meet."""
        existing = sorted(set(self.model.current) - set(self.opened))
        name = data.draw(st.sampled_from(existing) if existing and data.draw(st.booleans()) else NAMES)
        if name in self.opened:
            return
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0) | (os.O_APPEND if append else 0)
        self.opened[name] = Opened(os.open(self.path(name), flags, 0o644), append)
        current = self.model.current.setdefault(name, bytearray())
        if truncate:
            current.clear()

    @precondition(lambda self: bool(self.opened))
    @rule(data=st.data(), chunk=CHUNKS, offset=OFFSETS)
    def write(self, data: st.DataObject, chunk: bytes, offset: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.opened)))
        opened, current = self.opened[name], self.model.current[name]
        if opened.append:
            assert os.write(opened.fd, chunk) == len(chunk)
            offset = len(current)
        else:
            assert os.pwrite(opened.fd, chunk, offset) == len(chunk)
        if chunk:
            current.extend(b"\0" * max(0, offset + len(chunk) - len(current)))
            current[offset : offset + len(chunk)] = chunk

    @precondition(lambda self: bool(self.opened))
    @rule(data=st.data(), size=OFFSETS)
    def truncate(self, data: st.DataObject, size: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.opened)))
        os.ftruncate(self.opened[name].fd, size)
        current = self.model.current[name]
        del current[size:]
        current.extend(b"\0" * (size - len(current)))

    @precondition(lambda self: bool(self.opened))
    @rule(data=st.data(), close=st.booleans())
    def commit(self, data: st.DataObject, close: bool) -> None:
        """fsync, or close: either acknowledges the current bytes."""
        name = data.draw(st.sampled_from(sorted(self.opened)))
        if close:
            os.close(self.opened.pop(name).fd)
        else:
            os.fsync(self.opened[name].fd)
        self.model.acknowledged[name] = bytes(self.model.current[name])

    @rule(source=NAMES, destination=NAMES)
    def rename(self, source: str, destination: str) -> None:
        if (source == destination or source in self.opened or destination in self.opened
                or source not in self.model.current):
            return
        os.rename(self.path(source), self.path(destination))
        self.model.current[destination] = self.model.current.pop(source)
        self.model.acknowledged.pop(destination, None)
        if source in self.model.acknowledged:
            self.model.acknowledged[destination] = self.model.acknowledged.pop(source)

    @rule(name=NAMES)
    def remove(self, name: str) -> None:
        if name in self.opened or name not in self.model.current:
            return
        os.unlink(self.path(name))
        del self.model.current[name]
        self.model.acknowledged.pop(name, None)

    @precondition(lambda self: self.kills < 2 and bool(self.model.acknowledged))
    @rule()
    def kill_and_remount(self) -> None:
        """kill -9: what was not acknowledged is gone, what was is there again after the remount."""
        self.shared.kill_and_remount()
        self.kills += 1
        for opened in self.opened.values():
            with contextlib.suppress(OSError):
                os.close(opened.fd)
        self.opened.clear()
        self.model.current = {name: bytearray(data) for name, data in self.model.acknowledged.items()}

    # -- checks ------------------------------------------------------------------------------

    @invariant()
    def reads_give_the_current_bytes(self) -> None:
        if not hasattr(self, "model"):
            return
        assert sorted(os.listdir(self.directory)) == sorted(self.real(name) for name in self.model.current)
        for name, current in self.model.current.items():
            assert self.path(name).read_bytes() == bytes(current), name

    def teardown(self) -> None:
        """Close what is open (each close acknowledges) and leave the expected lake to the test."""
        for name, opened in self.opened.items():
            os.close(opened.fd)
            self.model.acknowledged[name] = bytes(self.model.current[name])
        self.shared.expected.append(Expected(
            self.dataset,
            {self.real(n): d for n, d in self.model.acknowledged.items() if not n.startswith(".")},
            {self.real(n) for n in self.model.acknowledged if n.startswith(".")}))


def test_the_outbox_lands_the_last_acknowledged_content(lake: LakeStatus, tmp_path: Path, rucio_client: Any) -> None:
    shared = SharedMount(lake, tmp_path)
    try:
        run_state_machine_as_test(
            lambda: OutboxMountMachine(shared),
            settings=settings(max_examples=int(os.environ.get("DATALAKEFS_MODEL_EXAMPLES", "25")),
                              stateful_step_count=25, deadline=None, derandomize=True,
                              # no shrinking: each step is a real mount's, and a failure prints its steps
                              phases=[Phase.explicit, Phase.reuse, Phase.generate],
                              suppress_health_check=list(HealthCheck)),
        )
        shared.mount.stop()
        mount = shared.start()  # the real RSE: the outbox drains
        scope = lake.seed.upload_scope if lake.seed else ""
        deadline = time.monotonic() + 300
        for run in shared.expected:
            directory = mount.mountpoint / ".outbox" / scope / run.dataset
            while waiting := set(os.listdir(directory)) - run.kept:
                assert time.monotonic() < deadline, f"the outbox did not drain: {waiting}"
                states = {n: os.getxattr(directory / n, "user.datalakefs.state") for n in waiting}
                assert not any(s.startswith(b"failed") for s in states.values()), states
                time.sleep(0.2)
            assert set(os.listdir(directory)) == run.kept  # temporary names are never uploaded
            for name, data in run.uploads.items():
                meta = rucio_client.get_metadata(scope, name)
                assert (meta["bytes"], meta["adler32"]) == (len(data), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"), name
                assert (mount.mountpoint / scope / run.dataset / name).read_bytes() == data, name
            attached = {d["name"] for d in rucio_client.list_content(scope, run.dataset)} if run.uploads else set()
            assert attached == set(run.uploads)
        print(f"\n[outbox model] runs={len(shared.expected)} names uploaded="
              f"{sum(len(run.uploads) for run in shared.expected)}")
    finally:
        shared.mount.stop()
