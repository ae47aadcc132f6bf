"""Mounting, serving and unmounting one FUSE session.

Order of events: clean a stale mount left by a killed daemon, ``pyfuse3.init`` (the mount exists
from here), run the request loop, and once the kernel's INIT has been answered raise the device's
``read_ahead_kb`` (written earlier, the INIT reply clamps it back to 128 KiB) and report readiness.
SIGTERM and SIGINT end the loop; the mount is always removed on the way out.

The mount-table helpers (:func:`mounts_of_type`, :func:`mount_of`, :func:`is_stale`, ...) serve the
command line and the notebook API too, so ``pyfuse3`` is imported only where a session is served:
everything else works where it is not installed (``pip install datalakefs`` without the ``fuse`` extra).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from datalakefs.errors import DatalakeError

if TYPE_CHECKING:
    import pyfuse3

FSTYPE = "fuse.datalakefs"

log = logging.getLogger(__name__)


class MountError(DatalakeError):
    """The mount point cannot be used; the message says why."""


HUNG_AFTER_S = 10.0
FUSECTL = Path("/sys/fs/fuse/connections")


def is_stale(mountpoint: str, hung_after: float = HUNG_AFTER_S) -> bool:
    """True for a mount whose daemon is gone: it answers ENOTCONN (ECONNABORTED for the first call
    after the death), or it does not answer at all and is aborted here.

    statfs, unlike stat, is never answered from the kernel's attribute cache, so it reaches the
    (dead) daemon even when the root's attributes are cached for an hour. A daemon killed while one
    of its threads was pushing an entry invalidation into the kernel can leave that thread stuck on a
    directory lock held by a request only the dead daemon could answer: the device is never closed,
    and every call on the mount waits forever. A mount that does not answer statfs within
    ``hung_after`` seconds is treated as that case and its connection aborted through fusectl.
    """
    answer: list[OSError | None] = []

    def ask() -> None:
        try:
            os.statvfs(mountpoint)
            answer.append(None)
        except OSError as exc:
            answer.append(exc)

    # a thread, because a call into a hung mount cannot be interrupted; the abort releases it
    probe = threading.Thread(target=ask, name="statfs-probe", daemon=True)
    probe.start()
    probe.join(hung_after)
    if not answer:
        log.warning("event=hung-mount mountpoint=%s waited_s=%g action=abort-connection", mountpoint, hung_after)
        abort_connection(os.path.realpath(mountpoint))
        return True
    error = answer[0]
    return error is not None and error.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def abort_connection(target: str) -> None:
    """Abort the FUSE connection of the mount at ``target`` (fusectl's ``abort``): every waiting and
    later call fails with ENOTCONN, so the mount can be unmounted. Mounts fusectl when needed."""
    fields = _mountinfo_fields(target)
    if fields is None:
        raise MountError(f"{target} is not mounted")
    connection = FUSECTL / fields[2].split(":")[1]
    if not connection.exists():
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], capture_output=True, check=False)
    try:
        (connection / "abort").write_text("1")
    except OSError as exc:
        raise MountError(f"{target} does not answer and its FUSE connection cannot be aborted "
                         f"({exc.strerror}): as root, `echo 1 > {connection}/abort`") from None


def _mountinfo_fields(target: str) -> list[str] | None:
    """The /proc/self/mountinfo line of the mount at the absolute path ``target``: the last one, which
    is the top of a stack (a FUSE mount over a container's volume).

    Reading mountinfo never touches the mount itself, which matters inside the daemon: a stat() of
    its own mount point would wait for a reply only this thread can give.
    """
    found = None
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if _unescape(fields[4]) == target:
                found = fields
    return found


def mounted_fstype(target: str) -> str | None:
    """The filesystem type mounted exactly at the absolute path ``target``."""
    fields = _mountinfo_fields(target)
    return None if fields is None else fields[fields.index("-") + 1]


def mounts_of_type(fstype: str) -> list[str]:
    """Mount points of every ``fstype`` mount in this mount namespace (``fuse.datalakefs``)."""
    with open("/proc/self/mountinfo") as fh:
        rows = [line.split() for line in fh]
    return [_unescape(fields[4]) for fields in rows if fields[fields.index("-") + 1] == fstype]


def mount_of(path: str) -> Path | None:
    """The datalakefs mount ``path`` is under (the innermost one), from the mount table; None when
    ``path`` does not exist or is not under one."""
    if not os.path.lexists(path):
        return None
    target = os.path.realpath(path)
    under = [m for m in mounts_of_type(FSTYPE) if target == m or target.startswith(m.rstrip("/") + "/")]
    return Path(max(under, key=len)) if under else None


def running_mounts() -> list[Path]:
    """Every datalakefs mount in this mount namespace, whoever made it."""
    return [Path(m) for m in sorted(mounts_of_type(FSTYPE))]


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Ask the kernel to unmount; raises MountError with fusermount3's words on failure."""
    args = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MountError(f"cannot unmount {mountpoint}: {done.stderr.strip() or done.returncode}")


def wait_gone(pid: int, timeout: float, tick: Callable[[], None] | None = None) -> bool:
    """True once process ``pid`` (a daemon after its unmount) no longer exists; False if it still
    does after ``timeout`` seconds. ``tick`` runs at every poll (a progress display)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
        if tick is not None:
            tick()
    return False


def prepare_mountpoint(mountpoint: str) -> str:
    """Clean a stale FUSE mount, refuse a live one, check the directory; returns the resolved path.

    Another kind of filesystem mounted there is no reason to refuse: a container's volume (the pod's
    shared ``/lake``) is a bind mount, and the lake is mounted on top of it. A FUSE mount whose daemon
    died or is wedged is never anyone's volume: it is lazily unmounted first."""
    target = os.path.realpath(mountpoint)
    if _is_fuse(mounted_fstype(target)) and is_stale(mountpoint):
        log.warning("event=stale-mount mountpoint=%s action=lazy-unmount", mountpoint)
        unmount(mountpoint, lazy=True)
    fstype = mounted_fstype(target)
    if _is_fuse(fstype):
        raise MountError(f"{mountpoint} is already a mount point (of {fstype})")
    if not os.path.isdir(target):
        raise MountError(f"{mountpoint} is not a directory")
    return target


def _is_fuse(fstype: str | None) -> bool:
    return fstype is not None and fstype.startswith("fuse")


def raise_read_ahead(target: str, kib: int) -> None:
    """Raise the bdi read-ahead of our own mount so the kernel sends 1 MiB READs."""
    fields = _mountinfo_fields(target)
    if fields is None:
        return
    path = f"/sys/class/bdi/{fields[2]}/read_ahead_kb"
    try:
        with open(path, "w") as fh:
            fh.write(str(kib))
    except OSError as exc:  # not root, or a kernel without the knob: slower, not wrong
        log.info("event=read-ahead-unchanged path=%s reason=%s", path, exc.strerror)


async def serve(
    operations: pyfuse3.Operations,
    initialized: trio.Event,
    target: str,
    options: set[str],
    read_ahead_kb: int,
    on_ready: Callable[[], None],
    max_tasks: int = 64,
) -> None:
    """Mount at ``target`` (as returned by :func:`prepare_mountpoint`) and serve until unmounted or
    signalled. ``initialized`` is set by the operations' ``init`` callback, i.e. when the kernel's
    INIT request has been handled."""
    import pyfuse3

    from datalakefs.fuse import loop

    loop.install()
    pyfuse3.init(operations, target, options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal)

            async def after_init() -> None:
                await initialized.wait()
                await trio.sleep(0.05)
                raise_read_ahead(target, read_ahead_kb)
                log.info("event=mounted mountpoint=%s", target)
                on_ready()

            nursery.start_soon(after_init)
            await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        log.info("event=unmounted mountpoint=%s", target)


async def _stop_on_signal() -> None:
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("event=signal signal=%s action=unmount", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
