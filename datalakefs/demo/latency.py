"""A latency-injecting TCP proxy: puts a service of the demo lake at a chosen distance.

The kernel here has no netem, so the bench places the storage and the catalogue "far away" by
putting this proxy in front of them. Each direction of every connection is a delay line: a chunk
read from one side is written to the other ``rtt / 2`` seconds later, so a request and its answer
pay one ``rtt`` in all, and many requests in flight on one connection overlap (as on a real long
link, unlike a proxy that sleeps before each forward). Chunks that are due together leave in one
send: a server that writes a row at a time must not cost the measured machine a syscall per row. An
optional rate cap serialises each direction at ``rate`` bytes per second before the delay (the
link's bandwidth).

One trio thread, no copies beyond the socket reads; a direction holds at most
:data:`BUFFERED_CHUNKS` chunks in its delay line, after which reading that side waits (backpressure).

Run it beside the lake: ``python -m datalakefs.demo.latency --listen 45000 --target 127.0.0.1:44001
--rtt-ms 30 [--rate-mbit 1000]``.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import trio

CHUNK = 1 << 16
BUFFERED_CHUNKS = 1024  # 64 MiB per direction at most


@dataclass(frozen=True, slots=True)
class Link:
    """The simulated path: round-trip time in seconds, bandwidth in bytes/s per direction (None: no cap)."""

    rtt: float
    rate: float | None = None


async def serve(listen_port: int, target: tuple[str, int], link: Link, *,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept on 127.0.0.1:``listen_port`` (0: any free port, reported through ``task_status``) and
    forward each connection to ``target`` over ``link``, until cancelled."""
    listeners = await trio.open_tcp_listeners(listen_port, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(client: trio.SocketStream) -> None:
        async with client:
            try:
                upstream = await trio.open_tcp_stream(*target)
            except OSError:
                return  # the client sees the connection close, as it would with the service down
            async with upstream:
                await forward_both_ways(client, upstream, link)

    await trio.serve_listeners(handle, listeners)


async def forward_both_ways(client: trio.SocketStream, upstream: trio.SocketStream, link: Link) -> None:
    """Both directions, each its own delay line; a reset on either side ends this connection, and
    only it (trio reports it inside an exception group, which ``contextlib.suppress`` lets through
    on Python 3.11: the whole proxy died when a client gave up mid-body)."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_direction, client, upstream, link)
            nursery.start_soon(_direction, upstream, client, link)
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _direction(source: trio.SocketStream, sink: trio.SocketStream, link: Link) -> None:
    """Copy ``source`` to ``sink`` with the link's delay (and rate); the end of ``source`` is passed on
    as a half-close after the same delay."""
    send, receive = trio.open_memory_channel[tuple[float, bytes]](BUFFERED_CHUNKS)
    one_way = link.rtt / 2

    async def deliver() -> None:
        async with receive:
            held: tuple[float, bytes] | None = None  # the next chunk, taken from the line but not due yet
            while True:
                try:
                    due, data = held or await receive.receive()
                except trio.EndOfChannel:
                    return
                await trio.sleep_until(due)
                # chunks that are due by now too leave in the same send: a server that writes a row
                # at a time (Rucio's listings) made this proxy spend half a CPU second per 100,000 rows
                pieces, held, now = [data], None, trio.current_time()
                while data:
                    try:
                        held = receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if held[0] > now:
                        break
                    data, held = held[1], None
                    pieces.append(data)
                if len(pieces) > 1 or data:
                    await sink.send_all(b"".join(pieces))
                if not data:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await sink.send_eof()
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver)
        async with send:
            sent_until = trio.current_time()  # when the link finishes serialising what it has so far
            while True:
                data = await source.receive_some(CHUNK)
                now = trio.current_time()
                sent_until = max(sent_until, now) + (len(data) / link.rate if link.rate else 0.0)
                await send.send((sent_until + one_way, data))
                if not data:
                    return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datalakefs.demo.latency", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=int, required=True, help="local port to accept on (127.0.0.1)")
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--rtt-ms", type=float, required=True, help="round-trip time to add, milliseconds")
    parser.add_argument("--rate-mbit", type=float, default=None, help="bandwidth cap per direction, Mbit/s")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    rate = args.rate_mbit * 1e6 / 8 if args.rate_mbit else None
    trio.run(serve, args.listen, (host or "127.0.0.1", int(port)), Link(args.rtt_ms / 1000, rate))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
