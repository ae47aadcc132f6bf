"""How pyfuse3's request loop runs on trio: one pass through the scheduler per FUSE request, not two.

pyfuse3 (3.5) serves requests from ``_session_loop`` tasks. Each takes pyfuse3's read lock (a
``trio.Lock``), waits for ``/dev/fuse`` to become readable (``trio.lowlevel.wait_readable``), releases the
lock, reads one request and runs its handler. It keeps one spare task waiting for the lock, so that a
handler that awaits (a cold read) does not hold up the next request. With trio's lock every request
cost two task steps: the task that the kernel's request wakes, and the spare it hands the lock to on
release, which takes it only to wait for the fd while the first task serves the request and, coming
back, parks on the lock. (With a single task, ``trio.Lock.acquire``'s checkpoint is the second pass.)

pyfuse3 looks ``trio`` up as a global of its module when it runs (the hook ``pyfuse3.asyncio.enable``
uses to put asyncio in its place). :func:`install` puts a stand-in there that is trio in everything but
``Lock``, whose lock is :class:`ReadLock`: a free lock is taken without a checkpoint, and a release hands
the lock to a waiting task only once the releasing task's step has ended (a trio instrument tells).
A handler that finishes without awaiting (a cache hit, a control file, open, flush, release) lets its
task come straight back for the lock and the next request: the spare sleeps on. A handler that awaits
ends the step and the spare takes over the fd, as before. pyfuse3's sources are not changed, and every
request still yields to trio once, in ``wait_readable``, which parks until the kernel has a request.

tests/fuse/test_fuse_loop.py mounts a small filesystem and counts the steps of pyfuse3's tasks per
request with a trio instrument: it fails if a pyfuse3 upgrade stops reading ``trio`` from its module
global or comes to take more than one step per request.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import trio


class ReadLock(trio.abc.Instrument):
    """pyfuse3's read lock: who reads the next request. Its own instrument: :meth:`after_task_step`
    hands it over once the task that released it has yielded to trio."""

    def __init__(self) -> None:
        self._owner: trio.lowlevel.Task | None = None
        self._waiting = trio.lowlevel.ParkingLot()
        self._released_by: trio.lowlevel.Task | None = None  # with tasks waiting: hand over after its step

    async def __aenter__(self) -> None:
        if self._owner is None:
            self._owner = trio.lowlevel.current_task()
            return
        await self._waiting.park()  # the hand-over makes this task the owner

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._owner = None
        if self._waiting:
            self._released_by = trio.lowlevel.current_task()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self._released_by:
            self._released_by = None
            if self._owner is None and self._waiting:
                (self._owner,) = self._waiting.unpark(count=1)


class _TrioForPyfuse3:
    """What pyfuse3 sees as its ``trio`` module: trio itself, but for ``Lock``."""

    def __init__(self, lock: ReadLock) -> None:
        self._lock = lock

    def Lock(self) -> ReadLock:  # trio's name
        return self._lock

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install() -> None:
    """Make pyfuse3 use a :class:`ReadLock` in this trio run: call in the run, before ``pyfuse3.main``
    (pyfuse3 makes its read lock once, at its first request)."""
    import pyfuse3

    lock = ReadLock()
    trio.lowlevel.add_instrument(lock)
    setattr(pyfuse3, "trio", _TrioForPyfuse3(lock))  # noqa: B010 (pyfuse3's stubs do not declare it)
