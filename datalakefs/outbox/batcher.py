"""Group commit for blocking batch calls: concurrent requests share one call per batch.

Each Rucio call costs a round trip of 50–150 ms whatever it carries, and each journal commit an
fsync, so uploads that are ready at the same time (and files closed at the same time) share one
call. Whoever submits queues its item and then waits for the batcher's turn; the task that gets the
turn makes one blocking call in a worker thread for everything queued (up to ``max_batch``, its own
item included) and wakes each submitter with its own result. While a call runs, new items gather for
the next one, so under load the batches grow by themselves and a lone item is answered at once.

No background task drives it: a submitter whose item an earlier turn already answered just returns.
A turn cut short (its task cancelled while the call runs) puts its unanswered items back at the head
of the queue, so the next turn asks again; batch calls must therefore be idempotent.
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
    answered: bool = False
    outcome: Result | Exception | None = None


@dataclass(eq=False)
class Batcher(Generic[Item, Result]):
    """One batch call at a time over everything submitted (see the module doc)."""

    call: BatchCall[Item, Result]
    max_batch: int
    _waiting: list[_Waiter[Item, Result]] = field(default_factory=list)
    _turn: trio.Lock = field(default_factory=trio.Lock)

    async def submit(self, item: Item) -> Result:
        """The result of ``item``'s part of a batch call (its exception is raised here)."""
        waiter: _Waiter[Item, Result] = _Waiter(item)
        self._waiting.append(waiter)
        while not waiter.answered:
            async with self._turn:
                if not waiter.answered:
                    await self._one_call()
        if isinstance(waiter.outcome, Exception):
            raise waiter.outcome
        return cast(Result, waiter.outcome)

    async def _one_call(self) -> None:
        size = max(1, self.max_batch)
        batch, self._waiting = self._waiting[:size], self._waiting[size:]
        try:
            try:
                outcomes = await trio.to_thread.run_sync(self.call, [w.item for w in batch], abandon_on_cancel=True)
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"a batch call answered {len(outcomes)} results for {len(batch)} items")
            except Exception as exc:  # the whole call failed: every item shares its error
                outcomes = [exc] * len(batch)
            for waiter, outcome in zip(batch, outcomes, strict=True):
                waiter.outcome, waiter.answered = outcome, True
        finally:
            self._waiting[:0] = [w for w in batch if not w.answered]
