"""Group commit: concurrent submissions share batch calls, and each gets its own answer."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from datalakefs.outbox.batcher import Batcher


class Doubler:
    """Doubles each number; a negative one is that item's error. Can hold its calls until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: Sequence[int]) -> list[int | Exception]:
        self.gate.wait(10)
        self.batches.append(list(items))
        return [ValueError(f"negative {n}") if n < 0 else 2 * n for n in items]


async def _gather(batcher: Batcher[int, int], items: list[int]) -> dict[int, int | str]:
    answers: dict[int, int | str] = {}

    async def one(n: int) -> None:
        try:
            answers[n] = await batcher.submit(n)
        except ValueError as exc:
            answers[n] = str(exc)

    async with trio.open_nursery() as nursery:
        for n in items:
            nursery.start_soon(one, n)
    return answers


async def test_each_submitter_gets_its_own_result_or_error() -> None:
    call = Doubler()
    batcher = Batcher(call, max_batch=100)
    answers = await _gather(batcher, [1, -2, 3])
    assert answers == {1: 2, -2: "negative -2", 3: 6}


async def test_items_submitted_while_a_call_runs_share_the_next_call() -> None:
    call = Doubler()
    batcher = Batcher(call, max_batch=4)
    async with trio.open_nursery() as nursery:
        call.gate.clear()
        first = trio.Event()

        async def lone() -> None:
            await batcher.submit(0)
            first.set()

        nursery.start_soon(lone)
        await trio.testing.wait_all_tasks_blocked()  # item 0's call is taken, held in its worker thread

        async def release() -> None:
            await trio.testing.wait_all_tasks_blocked()  # items 1 to 10 are all queued behind it
            call.gate.set()

        nursery.start_soon(release)
        answers = await _gather(batcher, list(range(1, 11)))
        await first.wait()
        nursery.cancel_scope.cancel()
    assert answers == {n: 2 * n for n in range(1, 11)}
    assert call.batches[0] == [0] and [len(batch) for batch in call.batches[1:]] == [4, 4, 2]
    assert sorted(n for batch in call.batches[1:] for n in batch) == list(range(1, 11))


async def test_a_failing_call_fails_every_item_of_its_batch() -> None:
    def broken(items: Sequence[int]) -> list[int | Exception]:
        raise ConnectionError("server down")

    batcher: Batcher[int, int] = Batcher(broken, max_batch=10)
    for n in range(3):
        with pytest.raises(ConnectionError, match="server down"):
            await batcher.submit(n)


async def test_a_call_answering_the_wrong_number_of_results_fails_its_items() -> None:
    batcher: Batcher[int, int] = Batcher(lambda items: [], max_batch=10)
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        await batcher.submit(1)


async def test_items_of_a_cancelled_turn_are_asked_again_by_the_next() -> None:
    """The task whose turn it is gets cancelled while its call runs (the call is abandoned in its
    thread): the other submitters of that batch are not stranded, the next turn asks again."""
    batches: list[list[int]] = []
    gates = {1: threading.Event(), 2: threading.Event()}  # holds the first and second calls

    def held(items: Sequence[int]) -> list[int | Exception]:
        batches.append(list(items))
        gate = gates.get(len(batches))
        if gate is not None:
            gate.wait(10)
        return [2 * n for n in items]

    async def calls_made(count: int) -> None:
        with trio.fail_after(10):
            while len(batches) < count:  # noqa: ASYNC110
                await trio.sleep(0.01)

    batcher = Batcher(held, max_batch=10)
    answers: dict[int, int] = {}
    cut_short = trio.CancelScope()

    async def one(n: int) -> None:
        answers[n] = await batcher.submit(n)

    async def cancelled_one(n: int) -> None:
        with cut_short:
            await one(n)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0)
            await calls_made(1)  # item 0's turn holds the first call: 1 and 2 queue behind it
            nursery.start_soon(cancelled_one, 1)
            await trio.testing.wait_all_tasks_blocked()  # item 1 queued before item 2
            nursery.start_soon(one, 2)
            await trio.testing.wait_all_tasks_blocked()
            gates[1].set()
            await calls_made(2)  # item 1's turn: one call for 1 and 2, held
            cut_short.cancel()
            await calls_made(3)
    gates[2].set()
    assert answers == {0: 0, 2: 4}
    assert batches == [[0], [1, 2], [1, 2]]
