"""Group commit for blocking batch calls: concurrent requests share one call per batch.

Each Rucio call costs a round trip of 50–150 ms whatever it carries, so uploads that are ready at
the same time register together: a task ``submit``s its item and sleeps; :meth:`Batcher.run` takes
everything submitted meanwhile (up to ``max_batch``), makes one blocking call in a worker thread and
wakes each task with its own result. While a call runs, new items gather for the next one, so under
load the batches grow by themselves and an idle uploader still answers a single item at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

import trio

Item = TypeVar("Item")
Result = TypeVar("Result")

#: The batch call returns, per item in order, its result or the exception to raise in its submitter.
BatchCall = Callable[[Sequence[Item]], Sequence[Result | Exception]]


@dataclass(eq=False)
class _Waiter(Generic[Item, Result]):
    item: Item
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Result | Exception | None = None


class Batcher(Generic[Item, Result]):
    """One batch call at a time over everything submitted (see the module doc)."""

    def __init__(self, call: BatchCall[Item, Result], max_batch: int) -> None:
        self._call = call
        self._max_batch = max(1, max_batch)
        self._waiting: list[_Waiter[Item, Result]] = []
        self._wake = trio.Event()

    async def submit(self, item: Item) -> Result:
        """The result of ``item``'s part of the next batch call (its exception is raised here)."""
        waiter: _Waiter[Item, Result] = _Waiter(item)
        self._waiting.append(waiter)
        self._wake.set()
        await waiter.done.wait()
        if isinstance(waiter.outcome, Exception):
            raise waiter.outcome
        return cast(Result, waiter.outcome)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._waiting:
                self._wake = trio.Event()
                await self._wake.wait()
            batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
            items = [waiter.item for waiter in batch]
            try:
                outcomes = await trio.to_thread.run_sync(self._call, items, abandon_on_cancel=True)
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"a batch call answered {len(outcomes)} results for {len(batch)} items")
            except Exception as exc:  # the whole call failed: every item shares its error
                outcomes = [exc] * len(batch)
            for waiter, outcome in zip(batch, outcomes, strict=True):
                waiter.outcome = outcome
                waiter.done.set()
