"""The latency-injecting TCP proxy of the demo tooling, on trio's MockClock: the delays it adds are
logical time, exact and instant (no wall-clock assertion)."""

from __future__ import annotations

import os
import socket
import struct

import trio
import trio.testing

from datalakefs.demo.latency import Link, _direction, serve

RTT = 0.030


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def proxied_echo_port(nursery: trio.Nursery, link: Link) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    echo_port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, echo, listeners)
    port: int = await nursery.start(serve, 0, ("127.0.0.1", echo_port), link)
    return port


async def proxied_echo(nursery: trio.Nursery, link: Link) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", await proxied_echo_port(nursery, link))


async def receive_exactly(stream: trio.SocketStream, count: int) -> bytes:
    received = bytearray()
    while len(received) < count:
        data = await stream.receive_some(count - len(received))
        assert data, "the connection closed early"
        received += data
    return bytes(received)


async def test_a_round_trip_pays_the_rtt_and_bytes_arrive_intact(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        async with await proxied_echo(nursery, Link(RTT)) as stream:
            payload = os.urandom(3 << 20)
            started = trio.current_time()
            async with trio.open_nursery() as both:
                both.start_soon(stream.send_all, payload)
                assert await receive_exactly(stream, len(payload)) == payload
            assert trio.current_time() - started >= RTT
        nursery.cancel_scope.cancel()


async def test_requests_in_flight_overlap_instead_of_paying_the_rtt_each(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        async with await proxied_echo(nursery, Link(RTT)) as stream:
            requests = [b"%d;" % index for index in range(10)]
            started = trio.current_time()
            for request in requests:  # each its own chunk: a proxy forwarding one at a time pays 10 RTTs
                await stream.send_all(request)
                await trio.sleep(RTT / 15)
            assert await receive_exactly(stream, len(b"".join(requests))) == b"".join(requests)
            assert trio.current_time() - started < 2 * RTT
        nursery.cancel_scope.cancel()


async def test_the_rate_cap_serialises_each_direction(autojump_clock: trio.testing.MockClock) -> None:
    rate = 1_000_000.0  # bytes/s
    async with trio.open_nursery() as nursery:
        async with await proxied_echo(nursery, Link(0.0, rate)) as stream:
            payload = b"x" * 500_000
            started = trio.current_time()
            async with trio.open_nursery() as both:
                both.start_soon(stream.send_all, payload)
                await receive_exactly(stream, len(payload))
            assert trio.current_time() - started >= len(payload) / rate
        nursery.cancel_scope.cancel()


async def test_a_half_close_is_passed_on(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        async with await proxied_echo(nursery, Link(RTT)) as stream:
            await stream.send_all(b"last words")
            await stream.send_eof()
            assert await receive_exactly(stream, 10) == b"last words"
            assert await stream.receive_some(100) == b""  # the echo server saw EOF and closed
        nursery.cancel_scope.cancel()


async def test_a_connection_reset_mid_transfer_ends_that_connection_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that gives up mid-body (a cancelled prefetch closes its connection) resets it: the
    proxy must go on serving every other connection, as a router would."""
    async with trio.open_nursery() as nursery:
        port = await proxied_echo_port(nursery, Link(RTT))
        doomed = await trio.open_tcp_stream("127.0.0.1", port)
        await doomed.send_all(os.urandom(4 << 20))  # echoed back into a client that never reads
        doomed.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await doomed.aclose()  # SO_LINGER 0: a reset, not a FIN
        await trio.sleep(10 * RTT)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"still there")
            assert await receive_exactly(stream, 11) == b"still there"
        nursery.cancel_scope.cancel()


class _Rows:
    """A source that has many small chunks ready at once (a server writing a row at a time), then ends."""

    def __init__(self, rows: list[bytes]) -> None:
        self.rows = rows

    async def receive_some(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.rows.pop(0) if self.rows else b""


class _Sink:
    """Notes each send, with the time it was made, and the end."""

    def __init__(self) -> None:
        self.sends: list[tuple[float, bytes]] = []
        self.ended_at: float | None = None

    async def send_all(self, data: bytes) -> None:
        self.sends.append((trio.current_time(), data))

    async def send_eof(self) -> None:
        self.ended_at = trio.current_time()


async def test_chunks_due_together_leave_in_one_send(autojump_clock: trio.testing.MockClock) -> None:
    """Chunks that arrived together are written together, one way later, intact and in order: one send
    per row would cost the proxy (and the machine the bench measures on) a syscall per row."""
    rows = [b"row %d\n" % index for index in range(50)]
    sink = _Sink()
    started = trio.current_time()
    await _direction(_Rows(list(rows)), sink, Link(RTT))  # type: ignore[arg-type]
    assert len(sink.sends) == 1
    sent_at, data = sink.sends[0]
    assert data == b"".join(rows) and sent_at - started >= RTT / 2
    assert sink.ended_at == sent_at
