"""The lake from Python, for notebooks: requests to a running mount, through its extended attributes
and control files. Nothing here runs a daemon or talks to Rucio, so it works wherever the mount is
visible (the notebook container of a pod, next to the sidecar that serves it) and without ``pyfuse3``.

    import datalakefs

    datalakefs.stage("/lake/physics/data18.00350000.RAW", wait=True)   # one rule, wait until OK
    datalakefs.state("/lake/physics/data18.00350000.RAW")              # 'rule 1a2b… OK: 3/3 locks OK'
    datalakefs.replicas("/lake/physics/data18.00350000.RAW/f1.root")   # ['LAKE-ORIGIN', 'SCRATCH']
    datalakefs.outbox_status()["summary"]                              # {'queued': 0, 'uploaded': 2, …}

Failures of the mount come as ``OSError`` with its errno (``EROFS`` on a read-only mount, ``ENODATA``
for a path that is not a DID, ``EIO`` with the reason in the daemon's log); a rule that gets STUCK
raises :class:`StagingError` with the rule's error text.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from datalakefs.errors import TransferError
from datalakefs.fs.lake import STAGE_XATTR
from datalakefs.fs.outbox import STATE_XATTR
from datalakefs.fuse.session import mount_of, running_mounts
from datalakefs.namespace.tree import CONTROL_DIR

__all__ = ["StagingError", "outbox_status", "replicas", "stage", "state", "status"]

REPLICAS_XATTR = "user.rucio.replicas"
_READY = re.compile(r"^(rule \S+ OK\b|staged on )")
_POLL_MAX = 5.0

PathLike = str | os.PathLike[str]


class StagingError(TransferError):
    """The staging rule is STUCK: the message is the DID's state, with the rule's error."""


def state(path: PathLike) -> str:
    """The staging (or streaming) state of the file, dataset or container at ``path``, one line:
    ``rule <id> REPLICATING: 1/3 locks OK``, ``rule <id> OK: 3/3 locks OK``, ``not staged``, ... Rules
    made by anyone on the mount's staging RSE count."""
    return os.getxattr(path, STATE_XATTR).decode()


def stage(path: PathLike, wait: bool = False, timeout: float | None = None, poll: float = 0.5) -> str:
    """Stage ``path`` (a file, dataset or container under a mount) on the mount's staging RSE with one
    replication rule, reusing a rule that is already there; returns its state.

    ``wait``: return only once the rule is OK (polling every ``poll`` seconds, backing off to 5 s),
    raise :class:`StagingError` when it is STUCK and ``TimeoutError`` after ``timeout`` seconds."""
    os.setxattr(path, STAGE_XATTR, b"1")
    current = state(path)
    deadline = None if timeout is None else time.monotonic() + timeout
    interval = poll
    while wait and not _READY.match(current):
        if " STUCK" in current:
            raise StagingError(f"{os.fspath(path)}: {current}")
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"{os.fspath(path)} not staged after {timeout} s: {current}")
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
        interval = min(interval * 1.5, _POLL_MAX)
        current = state(path)
    return current


def replicas(path: PathLike) -> list[str]:
    """The RSEs that hold a replica of the file at ``path``, in the order reads try them."""
    text = os.getxattr(path, REPLICAS_XATTR).decode()
    return [rse for rse in text.split(",") if rse]


def status(path: PathLike | None = None) -> dict[str, Any]:
    """What the daemon of the mount ``path`` is under reports (``.datalakefs/status.json``): cache,
    transfers, catalogue, staging, outbox. Without ``path``: the one running mount."""
    return _control_document(path, "status.json")


def outbox_status(path: PathLike | None = None) -> dict[str, Any]:
    """The upload queue of the mount ``path`` is under (``.datalakefs/outbox.json``): ``summary``
    (counts per state, pending bytes) and ``files`` (path, state, size, error of each). Without
    ``path``: the one running mount."""
    return _control_document(path, "outbox.json")


def _control_document(path: PathLike | None, name: str) -> dict[str, Any]:
    mountpoint = _the_mount(path)
    document: dict[str, Any] = json.loads((mountpoint / CONTROL_DIR / name).read_text())
    return document


def _the_mount(path: PathLike | None) -> Path:
    if path is not None:
        found = mount_of(os.fspath(path))
        if found is None:
            raise FileNotFoundError(f"{os.fspath(path)} is not under a running datalakefs mount")
        return found
    mounts = running_mounts()
    if len(mounts) != 1:
        names = ", ".join(map(str, mounts)) or "none"
        raise FileNotFoundError(f"name the mount: {len(mounts)} datalakefs mounts are running ({names})")
    return mounts[0]
