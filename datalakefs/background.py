"""Background work a service starts while the daemon runs, in a nursery the daemon owns.

A service that starts tasks of its own (rule polling, the replica sweep, the listing prefetch) has a
:class:`Background` and a ``run`` the daemon starts in its services nursery: the tasks end with the
mount, and while the service is not running nothing starts (an offline CLI, a unit test without it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio


class Background:
    """A nursery held open while :meth:`run` runs."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None

    @property
    def running(self) -> bool:
        return self._nursery is not None

    @property
    def tasks(self) -> int:
        return len(self._nursery.child_tasks) if self._nursery is not None else 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery until cancelled (the daemon's services nursery); its tasks end with it."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start ``fn(*args)`` if running; False (nothing started) otherwise."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True
