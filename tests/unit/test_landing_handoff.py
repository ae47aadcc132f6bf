"""The hand-off of landed blocks from the transport's thread to trio: trio is woken only for a block a
reader waits for, once per batch; the other blocks land when trio next looks."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from datalakefs.staging.stream import fetch
from datalakefs.staging.stream.fetch import LandingHandoff, _Pending
from tests.faults.harness import BS, info_of, open_reader, payload, read_all, running
from tests.faults.origin import FaultyOrigin


class _CountingToken:
    """A trio token that counts the wake-ups asked of it."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.wakeups = 0

    def run_sync_soon(self, call: object) -> None:
        self.wakeups += 1
        self.token.run_sync_soon(call)  # type: ignore[arg-type]


async def test_blocks_nobody_waits_for_wake_nothing_and_land_at_the_next_flush() -> None:
    token = _CountingToken(trio.lowlevel.current_trio_token())
    handoff = LandingHandoff(token)  # type: ignore[arg-type]
    delivered: list[int] = []
    for index in range(3):
        handoff.put(lambda index=index: delivered.append(index), _Pending())  # type: ignore[misc]
    handoff.put(lambda: delivered.append(3), None)  # a block whose run no longer has it pending
    await trio.testing.wait_all_tasks_blocked()
    assert token.wakeups == 0 and delivered == []
    handoff.flush()
    assert delivered == [0, 1, 2, 3]  # in landing order


async def test_a_block_a_reader_waits_for_wakes_trio_once_with_the_blocks_before_it() -> None:
    token = _CountingToken(trio.lowlevel.current_trio_token())
    handoff = LandingHandoff(token)  # type: ignore[arg-type]
    delivered: list[int] = []
    waited = _Pending()
    handoff.await_block(waited)
    assert waited.awaited
    handoff.put(lambda: delivered.append(0), _Pending())
    handoff.put(lambda: delivered.append(1), waited)
    handoff.put(lambda: delivered.append(2), waited)  # trio was woken already: no second wake-up
    assert token.wakeups == 1 and delivered == []
    await trio.testing.wait_all_tasks_blocked()
    assert delivered == [0, 1, 2]
    handoff.put(lambda: delivered.append(3), waited)  # the queue was taken: a new wake-up
    assert token.wakeups == 2
    await trio.testing.wait_all_tasks_blocked()
    assert delivered == [0, 1, 2, 3]


async def test_a_block_landed_just_before_its_reader_waits_lands_when_it_does() -> None:
    """No lost wake-up: the block was queued unmarked, and the reader's mark takes the queue."""
    token = _CountingToken(trio.lowlevel.current_trio_token())
    handoff = LandingHandoff(token)  # type: ignore[arg-type]
    delivered: list[int] = []
    pending = _Pending()
    handoff.put(lambda: delivered.append(0), pending)
    assert delivered == []
    handoff.await_block(pending)
    assert delivered == [0] and token.wakeups == 0


async def test_blocks_landed_on_another_thread_reach_a_reader_waiting_for_the_last() -> None:
    handoff = LandingHandoff(trio.lowlevel.current_trio_token())
    delivered: list[int] = []
    blocks = [_Pending() for _ in range(200)]

    def land(index: int) -> None:
        delivered.append(index)
        blocks[index].event.set()

    def transport_thread() -> None:
        for index, pending in enumerate(blocks):
            handoff.put(lambda index=index: land(index), pending)  # type: ignore[misc]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, transport_thread)
        handoff.await_block(blocks[-1])
        with trio.fail_after(10):
            await blocks[-1].event.wait()
    assert delivered == list(range(200))


async def test_blocks_fetched_ahead_with_no_reader_waiting_never_wake_trio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transfer nobody waits for lands its blocks when it returns: trio's thread is not woken for any
    of them, and they are all in the cache then."""
    tokens: list[_CountingToken] = []

    class CountingHandoff(LandingHandoff):
        def __init__(self, token: trio.lowlevel.TrioToken) -> None:
            tokens.append(_CountingToken(token))
            super().__init__(tokens[-1])  # type: ignore[arg-type]

    monkeypatch.setattr(fetch, "LandingHandoff", CountingHandoff)
    data = payload(16 * BS + 5, seed=5)
    info = info_of("ahead", data)
    with FaultyOrigin({"ahead": data}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, info, origin.url("ahead"))
            service.request(reader, 0, 17)
            with trio.fail_after(20):
                while not service.statistics().requests or service.statistics().transfers_in_flight:  # noqa: ASYNC110
                    await trio.sleep(0.01)  # no event to wait on: the transfer's task ends
            assert service.cached_bytes(info) == len(data)
            assert [token.wakeups for token in tokens] == [0]
            assert await read_all(reader) == data
