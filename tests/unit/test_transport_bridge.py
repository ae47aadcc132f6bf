"""The trio <-> asyncio bridge: results, errors, cancellation that waits, shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from datalakefs.transport.aio_bridge import AioBridge, TransportClosedError


async def test_run_returns_the_coroutine_result_computed_on_the_loop_thread(bridge: AioBridge) -> None:
    async def where(x: int) -> tuple[int, str]:
        await asyncio.sleep(0)
        return x * 2, threading.current_thread().name

    assert await bridge.run(where, 21) == (42, "datalakefs-aio")


async def test_exceptions_propagate_unchanged(bridge: AioBridge) -> None:
    async def boom() -> None:
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        await bridge.run(boom)


async def test_cancelling_the_caller_waits_until_the_asyncio_task_has_finished(bridge: AioBridge) -> None:
    events: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.05)  # cleanup that takes a while must still finish first
            events.append("cleaned up")

    with trio.move_on_after(0.1) as scope:
        await bridge.run(slow)
    assert scope.cancelled_caught
    assert events == ["cleaned up"]


async def test_many_concurrent_calls(bridge: AioBridge) -> None:
    async def echo(i: int) -> int:
        await asyncio.sleep(0.001)
        return i

    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await bridge.run(echo, i)

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert results == {i: i for i in range(200)}


async def test_close_fails_running_calls_and_refuses_new_ones() -> None:
    bridge = AioBridge()
    bridge.start()
    started = trio.Event()

    async def forever() -> None:
        await asyncio.sleep(3600)

    async def caller() -> None:
        started.set()
        with pytest.raises(TransportClosedError):
            await bridge.run(forever)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await started.wait()
        await trio.sleep(0.05)
        await bridge.aclose()
    with pytest.raises(TransportClosedError):
        await bridge.run(forever)
    bridge.close()  # idempotent
