"""Bulk range GETs whose body is received straight into the sink's memory, on the asyncio thread.

Why: through aiohttp, every piece of a body is read by uvloop into its own buffer, copied into a new
``bytes`` object that aiohttp's parser and stream reader pass on, and copied again by the cache writer
into its page-aligned block buffer (a profile of a cold 1 GiB read had a quarter of the daemon's CPU in
``memmove``). Here the connection is an :class:`asyncio.BufferedProtocol`: uvloop asks it where to put
the bytes it reads (``get_buffer``), and during a body it answers with the block buffer itself
(:class:`~datalakefs.transport.http.BufferSink`), so the kernel, or over TLS the SSL object's
decryption, writes the body where it is stored. A sink that lends no memory gets the bytes through
``write``, from the connection's one reused receive buffer (no new object per piece).

:class:`BulkRangeClient` is used by :class:`~datalakefs.transport.http.HttpTransport` for the URLs it
:meth:`~BulkRangeClient.supports` (``http://`` and ``https://`` without user info), and makes one
attempt: the caller adds the deadline, the renewal of refused credentials and the error mapping. The
request, the head's parsing and checks and the reuse of keep-alive connections are those of
:mod:`datalakefs.transport.http1`, as in the trio client of small ranges: only a closed range is sent,
the reply must announce exactly the range's bytes, no byte for ``stall_timeout`` seconds is a timeout,
a connection goes back to the pool only after a complete exchange, and a pooled connection the server
closed meanwhile is replaced once. A redirect is answered :class:`Redirected` before any byte reached
the sink: aiohttp, which follows redirects, takes the transfer then.

Everything here runs on the bridge's loop thread. Idle connections are kept per (host, port, TLS
context), at most ``max_idle`` each; the number of connections in use is bounded by the callers (the
stream service's transfer slots).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import cast

from datalakefs.transport.http1 import (
    BufferSink,
    FailureKind,
    Head,
    IdlePool,
    RangeGet,
    RangeReadError,
    RangeSink,
    StaleConnection,
    exchange_once,
    head_end,
    parse_head,
    split_url,
)

_RECEIVE = 256 << 10  # the connection's own receive buffer: for heads and for sinks that lend no memory
_HEAD_READ = 16 << 10  # read at most this much while the head is incomplete: body bytes read with it are copied

_SCHEMES = ("http", "https")
_Key = tuple[str, int, ssl.SSLContext | None]


class Redirected(Exception):
    """The server answered with a redirect, which this client does not follow."""


class _Connection(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection; serves one exchange at a time (:meth:`request`, then :meth:`body`).

    Reading is paused only between a head and its body, so that no body byte is read before the
    exchange knows where it goes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stall: float) -> None:
        self._loop = loop
        self._stall = stall
        self._transport: asyncio.Transport | None = None
        self._receive = memoryview(bytearray(_RECEIVE))
        self._head = bytearray()
        self._waiter: asyncio.Future[None] | None = None  # the exchange's current wait
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._url = ""
        self._reused = False
        self.head: Head | None = None
        self._leftover = b""  # body bytes that came with the head
        self._sink: RangeSink | None = None  # set while a body is being received
        self._lender: BufferSink | None = None
        self._lent = False  # the last buffer handed to the loop was the sink's
        self._start = self._pos = self._end = 0
        self.lost = False

    # -- asyncio.BufferedProtocol (called by the loop) ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        self._lent = False
        sink = self._sink
        if sink is None:
            return self._receive[:_HEAD_READ]
        if self._lender is not None:
            try:
                lent = self._lender.receive_buffer(self._pos)
            except Exception as exc:  # a bug of the sink: fail this transfer, not the loop
                waiter = self._waiter
                if waiter is not None and not waiter.done():
                    waiter.set_exception(exc)  # buffer_updated closes the connection, not the allocation
            else:
                if lent is not None and len(lent):
                    self._lent = True
                    return lent[: self._end - self._pos]
        return self._receive[: self._end - self._pos]

    def buffer_updated(self, nbytes: int) -> None:
        self._last_data = self._loop.time()
        waiter = self._waiter
        if waiter is None or waiter.done():  # bytes nobody asked for: the connection cannot be reused
            self.close()
            return
        try:
            if self._sink is None:
                self._head_received(waiter, nbytes)
            else:
                self._body_received(waiter, self._sink, nbytes)
        except Exception as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        why = f" ({exc!r})" if exc is not None else ""
        error: Exception
        if self._sink is not None:
            done, length = self._pos - self._start, self._end - self._start
            error = RangeReadError(FailureKind.SHORT_BODY, self._url, f"body ended after {done} of {length} bytes{why}")
        elif self._reused and not self._head:
            error = StaleConnection()
        else:
            error = RangeReadError(FailureKind.CONNECTION, self._url, f"connection closed in the reply head{why}")
        waiter.set_exception(error)

    # -- the exchange (called by BulkRangeClient, on the loop thread) -------------------------------------

    async def request(self, request: bytes, url: str, reused: bool) -> Head:
        """Send ``request`` and return the reply's head (reading then pauses until :meth:`body`)."""
        assert self._transport is not None
        if self.lost or self._transport.is_closing():
            if reused:
                raise StaleConnection
            raise RangeReadError(FailureKind.CONNECTION, url, "connection closed before a reply")
        self._url, self._reused, self.head = url, reused, None
        self._head.clear()
        self._transport.write(request)
        await self._wait()
        assert self.head is not None
        return self.head

    async def body(self, sink: RangeSink, start: int, length: int) -> None:
        """Receive the body, ``length`` bytes at file offset ``start``, into ``sink``."""
        assert self._transport is not None
        leftover, self._leftover = self._leftover, b""
        if len(leftover) > length:
            raise RangeReadError(FailureKind.BAD_REPLY, self._url, f"body longer than {length} bytes")
        if leftover:
            sink.write(start, leftover)
        if len(leftover) < length:
            self._sink = sink
            self._lender = sink if isinstance(sink, BufferSink) else None
            self._start, self._pos, self._end = start, start + len(leftover), start + length
        self._transport.resume_reading()
        if self._sink is not None:
            await self._wait()

    def detach(self) -> None:
        """The exchange is over (however it ended): nothing it gave is touched any more."""
        self._sink = self._lender = self._waiter = None
        self._leftover = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self.lost = True
        if self._transport is not None:
            self._transport.abort()

    # -- internals -------------------------------------------------------------------------------------

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        self._last_data = self._loop.time()
        self._timer = self._loop.call_at(self._last_data + self._stall, self._check_stall)
        try:
            await waiter
        finally:
            self._timer.cancel()
            self._timer = None

    def _check_stall(self) -> None:
        deadline = self._last_data + self._stall
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check_stall)
            return
        self._fail(RangeReadError(FailureKind.TIMEOUT, self._url, f"no data for {self._stall:g} s"))

    def _head_received(self, waiter: asyncio.Future[None], nbytes: int) -> None:
        self._head += self._receive[:nbytes]
        end = head_end(self._head, self._url)
        if end < 0:
            return
        self.head = parse_head(bytes(self._head[:end]), self._url)
        self._leftover = bytes(self._head[end + 4 :])
        assert self._transport is not None
        self._transport.pause_reading()  # until body() says where the body goes
        waiter.set_result(None)

    def _body_received(self, waiter: asyncio.Future[None], sink: RangeSink, nbytes: int) -> None:
        if self._lent:
            assert self._lender is not None
            self._lender.received(self._pos, nbytes)
        else:
            sink.write(self._pos, self._receive[:nbytes])
        self._pos += nbytes
        if self._pos == self._end:
            # Reading goes on: a server closing the idle connection is noticed (``lost``), and any byte
            # it sends now answers nothing, so it closes the connection (``buffer_updated``).
            self._sink = self._lender = None
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._sink = self._lender = None
        self.close()


class BulkRangeClient:
    """Range GETs received into the sink's memory; see the module docstring. Use on the loop thread."""

    def __init__(self, *, stall_timeout: float = 30.0, connect_timeout: float = 10.0, max_idle: int = 16) -> None:
        self._stall = stall_timeout
        self._connect = connect_timeout
        self._idle: IdlePool[_Key, _Connection] = IdlePool(max_idle)
        self._default_tls: ssl.SSLContext | None = None

    @staticmethod
    def supports(url: str) -> bool:
        return split_url(url, _SCHEMES) is not None

    async def fetch(
        self,
        url: str,
        start: int,
        length: int,
        total: int,
        sink: RangeSink,
        headers: dict[str, str],
        context: ssl.SSLContext | None,
    ) -> None:
        """One attempt at bytes ``[start, start+length)`` of ``url`` into ``sink`` (which it does not
        close), sending ``headers``; over https with ``context`` (None: the system's CAs)."""
        where = split_url(url, _SCHEMES)
        assert where is not None  # the caller asked supports()
        parts, (host, port) = where
        tls = parts.scheme == "https"
        if tls and context is None:
            context = self._default_context()
        key: _Key = (host, port, context if tls else None)
        get = RangeGet(url, start, length, total, sink)
        exchange = functools.partial(self._exchange, key, get, get.request(parts, headers))
        await exchange_once(self._take(key), functools.partial(self._open, key, url), exchange, url)

    def close(self) -> None:
        """Close the idle connections."""
        for connection in self._idle.drain():
            connection.close()

    def _default_context(self) -> ssl.SSLContext:
        if self._default_tls is None:
            self._default_tls = ssl.create_default_context()
        return self._default_tls

    def _take(self, key: _Key) -> _Connection | None:
        while (connection := self._idle.take(key)) is not None and connection.lost:
            connection.close()
        return connection

    async def _open(self, key: _Key, url: str) -> _Connection:
        host, port, context = key
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, self._stall), host, port, ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except (OSError, TimeoutError) as exc:
            raise RangeReadError(FailureKind.CONNECTION, url, str(exc) or repr(exc)) from None
        return connection

    async def _exchange(self, key: _Key, get: RangeGet, request: bytes, connection: _Connection, reused: bool) -> None:
        clean = False
        try:
            head = await connection.request(request, get.url, reused)
            if 300 <= head.status < 400:
                raise Redirected
            get.check(head)
            await connection.body(get.sink, get.start, get.length)
            clean = head.keep_alive
        finally:
            connection.detach()
            if not (clean and not connection.lost and self._idle.give(key, connection)):
                connection.close()
