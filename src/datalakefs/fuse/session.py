"""Mounting, serving and unmounting one FUSE session.

Order of events: clean a stale mount left by a killed daemon, ``pyfuse3.init`` (the mount exists
from here), run the request loop, and once the kernel's INIT has been answered raise the device's
``read_ahead_kb`` (written earlier, the INIT reply clamps it back to 128 KiB) and report readiness.
SIGTERM and SIGINT end the loop; the mount is always removed on the way out.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
from collections.abc import Callable

import pyfuse3
import trio

from datalakefs.errors import DatalakeError

log = logging.getLogger(__name__)


class MountError(DatalakeError):
    """The mount point cannot be used; the message says why."""


def is_stale(mountpoint: str) -> bool:
    """A mount whose daemon died answers ENOTCONN (ECONNABORTED for the first call after the death).

    statfs, unlike stat, is never answered from the kernel's attribute cache, so it reaches the
    (dead) daemon even when the root's attributes are cached for an hour.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _mountinfo_fields(target: str) -> list[str] | None:
    """The /proc/self/mountinfo line of the mount at the absolute path ``target``.

    Reading mountinfo never touches the mount itself, which matters inside the daemon: a stat() of
    its own mount point would wait for a reply only this thread can give.
    """
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if _unescape(fields[4]) == target:
                return fields
    return None


def mounted_fstype(target: str) -> str | None:
    """The filesystem type mounted exactly at the absolute path ``target``."""
    fields = _mountinfo_fields(target)
    return None if fields is None else fields[fields.index("-") + 1]


def mounts_of_type(fstype: str) -> list[str]:
    """Mount points of every ``fstype`` mount in this mount namespace (``fuse.datalakefs``)."""
    with open("/proc/self/mountinfo") as fh:
        rows = [line.split() for line in fh]
    return [_unescape(fields[4]) for fields in rows if fields[fields.index("-") + 1] == fstype]


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Ask the kernel to unmount; raises MountError with fusermount3's words on failure."""
    args = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MountError(f"cannot unmount {mountpoint}: {done.stderr.strip() or done.returncode}")


def prepare_mountpoint(mountpoint: str) -> str:
    """Clean a stale mount, refuse a live one, check the directory; returns the resolved path."""
    if is_stale(mountpoint):
        log.warning("event=stale-mount mountpoint=%s action=lazy-unmount", mountpoint)
        unmount(mountpoint, lazy=True)
    target = os.path.realpath(mountpoint)
    if mounted_fstype(target) is not None:
        raise MountError(f"{mountpoint} is already a mount point")
    if not os.path.isdir(target):
        raise MountError(f"{mountpoint} is not a directory")
    return target


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
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("event=signal signal=%s action=unmount", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
