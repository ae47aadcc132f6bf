"""The hand-off of landed blocks from the transport's thread to trio: one wake-up per batch."""

from __future__ import annotations

import trio
import trio.testing

from datalakefs.staging.stream.fetch import LandingHandoff


class _CountingToken:
    """A trio token that counts the wake-ups asked of it."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.wakeups = 0

    def run_sync_soon(self, call: object) -> None:
        self.wakeups += 1
        self.token.run_sync_soon(call)  # type: ignore[arg-type]


async def test_blocks_landed_before_trio_takes_them_share_one_wakeup() -> None:
    token = _CountingToken(trio.lowlevel.current_trio_token())
    handoff = LandingHandoff(token)  # type: ignore[arg-type]
    delivered: list[int] = []
    for index in range(3):  # trio cannot run between these: they land as one batch
        handoff.put(lambda index=index: delivered.append(index))  # type: ignore[misc]
    assert token.wakeups == 1 and delivered == []
    await trio.testing.wait_all_tasks_blocked()
    assert delivered == [0, 1, 2]  # in landing order
    handoff.put(lambda: delivered.append(3))  # the queue was empty again: a new wake-up
    assert token.wakeups == 2
    await trio.testing.wait_all_tasks_blocked()
    assert delivered == [0, 1, 2, 3]


async def test_blocks_landed_on_another_thread_all_arrive() -> None:
    handoff = LandingHandoff(trio.lowlevel.current_trio_token())
    arrived = trio.Event()
    delivered: list[int] = []

    def land(index: int) -> None:
        delivered.append(index)
        if len(delivered) == 200:
            arrived.set()

    def transport_thread() -> None:
        for index in range(200):
            handoff.put(lambda index=index: land(index))  # type: ignore[misc]

    await trio.to_thread.run_sync(transport_thread)
    with trio.fail_after(10):
        await arrived.wait()
    assert delivered == list(range(200))
