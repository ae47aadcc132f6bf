"""Small closed-range GETs on the trio thread, over plain HTTP/1.1 keep-alive connections.

Why: a piece read (a few KiB for a random ``pread``) through the asyncio thread pays two cross-thread
wake-ups and the bulk client's per-request work, several times the network's own latency on a local
link. Trio sockets answer it on the thread that serves FUSE. Bulk transfers stay with
:class:`~datalakefs.transport.http.HttpTransport` (its bulk client, or aiohttp), and so does any URL this
client does not take (:meth:`TrioRangeClient.supports`: only ``http://`` without user info; TLS, proxies,
redirects and credentials in URLs are the transport's). Requests carry the same
:class:`~datalakefs.transport.http.RequestAuth` headers as bulk transfers, and a refusal (401/403) renews
the credentials once, as there.

The contract of :meth:`TrioRangeClient.fetch` is :meth:`HttpTransport.fetch`'s: only a closed, in-bounds
range is sent; the reply head is checked by :func:`~datalakefs.transport.http.check_reply`; the body must
have exactly ``Content-Length`` = ``length`` bytes (no chunked encoding); every byte goes to
``sink.write`` in order and ``sink.close`` is called once; no byte for ``stall_timeout`` seconds is a
timeout, and so is a fetch not done within its ``deadline``; failures raise ``RangeReadError``. A
connection goes back to the pool only after a complete, clean exchange; a pooled connection the server
closed meanwhile is replaced once, transparently.

A connection is a plain non-blocking socket: the request is sent and the reply received at once, and the
task waits for the socket (``trio.lowlevel.wait_writable``/``wait_readable``) only when the kernel has
nothing to give (``EAGAIN``). A trio stream instead pays a pass of the scheduler (an ``epoll_wait``) for
every send or receive that succeeds, which on a local link costs more than the GET itself; so a reply
already there costs no pass, and a random 4 KiB read pays one: the wait for its reply.
"""

from __future__ import annotations

import functools
import math
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import trio

from datalakefs.transport.deadlines import Deadline
from datalakefs.transport.http import FailureKind, NoAuth, RangeReadError, RangeSink, RequestAuth
from datalakefs.transport.http1 import (
    Head,
    IdlePool,
    RangeGet,
    StaleConnection,
    exchange_once,
    head_end,
    parse_head,
    split_url,
)

_RECEIVE = 256 << 10


_SCHEMES = ("http",)


class _Connection:
    """A kept-alive socket, and the time limits of the exchange it carries: ``scope``, the fetch's one
    cancel scope, whose deadline each wait sets to the earlier of ``until`` (the fetch's deadline) and
    the stall timeout from now."""

    __slots__ = ("buffer", "scope", "sock", "until")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buffer = bytearray()
        self.scope: trio.CancelScope | None = None
        self.until = math.inf

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class TrioRangeClient:
    """Range GETs of plain-HTTP URLs from trio tasks; see the module docstring."""

    def __init__(
        self,
        *,
        stall_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        auth: RequestAuth | None = None,
        max_idle: int = 8,
        deadline: Deadline | None = None,
    ) -> None:
        self._deadline = deadline
        self._stall = stall_timeout
        self._connect = connect_timeout
        self._auth: RequestAuth = auth if auth is not None else NoAuth()
        self._idle: IdlePool[tuple[str, int], _Connection] = IdlePool(max_idle)

    @staticmethod
    def supports(url: str) -> bool:
        return split_url(url, _SCHEMES) is not None

    async def fetch(self, url: str, start: int, length: int, total: int, sink: RangeSink) -> None:
        """Read bytes ``[start, start+length)`` of a ``total``-byte file at ``url`` into ``sink``."""
        try:
            if start < 0 or length <= 0 or start + length > total:
                raise ValueError(f"range {start}+{length} is not a closed range inside a {total}-byte file")
            if not self.supports(url):
                raise ValueError(f"{url.split(':', 1)[0]}: URL not handled by the trio client")
            until = trio.current_time() + self._deadline.seconds(length) if self._deadline else math.inf
            # One cancel scope for the deadline and every wait's stall timeout (_wait sets its deadline):
            # a scope per wait cost a piece read a second scope's setup and deadline bookkeeping.
            with trio.CancelScope() as scope:
                try:
                    await self._get(url, start, length, total, sink, scope, until)
                except RangeReadError as exc:
                    # a refusal is detected before any byte reaches the sink, so the GET can be repeated
                    if exc.kind is not FailureKind.DENIED or not self._auth.renew():
                        raise
                    await self._get(url, start, length, total, sink, scope, until)
            if scope.cancelled_caught:
                if self._deadline is not None and trio.current_time() >= until:
                    raise RangeReadError(FailureKind.TIMEOUT, url, self._deadline.explain(length))
                raise RangeReadError(FailureKind.TIMEOUT, url, f"no data for {self._stall:g} s")
        finally:
            sink.close()

    async def _get(self, url: str, start: int, length: int, total: int, sink: RangeSink, scope: trio.CancelScope,
                   until: float) -> None:
        where = split_url(url, _SCHEMES)
        assert where is not None  # fetch() took the URL
        parts, address = where
        get = RangeGet(url, start, length, total, sink)
        exchange = functools.partial(self._exchange, address, get, get.request(parts, self._auth.headers(url)),
                                     scope, until)
        await exchange_once(self._idle.take(address), functools.partial(self._open, address, url, scope, until),
                            exchange, url)

    async def aclose(self) -> None:
        for connection in self._idle.drain():
            connection.close()

    async def _open(self, address: tuple[str, int], url: str, scope: trio.CancelScope, until: float) -> _Connection:
        scope.deadline = until  # a stall timeout an earlier wait of this fetch set is not the connect's limit
        try:
            with trio.fail_after(self._connect):
                stream = await trio.open_tcp_stream(*address)  # name resolution, happy eyeballs, TCP_NODELAY
        except (OSError, trio.TooSlowError) as exc:
            raise RangeReadError(FailureKind.CONNECTION, url, str(exc) or repr(exc)) from None
        return _Connection(socket.socket(fileno=stream.socket.detach()))

    async def _send(self, connection: _Connection, request: bytes) -> None:
        view = memoryview(request)
        while view:
            try:
                view = view[connection.sock.send(view):]
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_writable, connection)

    async def _receive(self, connection: _Connection) -> bytes:
        while True:
            try:
                return connection.sock.recv(_RECEIVE)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_readable, connection)

    async def _wait(self, wait: Callable[[socket.socket], Coroutine[Any, Any, None]], connection: _Connection) -> None:
        """Until the socket is ready; the exchange's scope (see :meth:`fetch`) ends the fetch when no byte
        comes for the stall timeout, or at the fetch's deadline."""
        assert connection.scope is not None  # set by _exchange
        connection.scope.deadline = min(connection.until, trio.current_time() + self._stall)
        await wait(connection.sock)

    async def _exchange(
        self, address: tuple[str, int], get: RangeGet, request: bytes, scope: trio.CancelScope, until: float,
        connection: _Connection, reused: bool
    ) -> None:
        connection.scope, connection.until = scope, until
        clean = False
        try:
            try:
                await self._send(connection, request)
                head = await self._read_head(connection, get.url, reused)
            except OSError as exc:
                if reused:
                    raise StaleConnection from None
                raise RangeReadError(FailureKind.CONNECTION, get.url, str(exc) or repr(exc)) from None
            get.check(head)
            await self._body(connection, get.url, get.start, get.length, get.sink)
            clean = head.keep_alive and not connection.buffer
        finally:
            connection.scope = None
            if not (clean and self._idle.give(address, connection)):
                connection.close()

    async def _read_head(self, connection: _Connection, url: str, reused: bool) -> Head:
        buffer = connection.buffer
        while (end := head_end(buffer, url)) < 0:
            chunk = await self._receive(connection)
            if not chunk:
                if reused and not buffer:
                    raise StaleConnection
                raise RangeReadError(FailureKind.CONNECTION, url, "connection closed in the reply head")
            buffer += chunk
        head = parse_head(bytes(buffer[:end]), url)
        del buffer[: end + 4]
        return head

    async def _body(self, connection: _Connection, url: str, start: int, length: int, sink: RangeSink) -> None:
        pos, limit = start, start + length
        while pos < limit:
            if connection.buffer:
                chunk = bytes(connection.buffer[: limit - pos])
                del connection.buffer[: len(chunk)]
            else:
                try:
                    chunk = await self._receive(connection)
                except OSError as exc:
                    raise RangeReadError(FailureKind.SHORT_BODY, url,
                                         f"body ended after {pos - start} of {length} bytes ({exc!r})") from None
                if not chunk:
                    raise RangeReadError(FailureKind.SHORT_BODY, url,
                                         f"body ended after {pos - start} of {length} bytes")
                if len(chunk) > limit - pos:
                    raise RangeReadError(FailureKind.BAD_REPLY, url, f"body longer than {length} bytes")
            sink.write(pos, chunk)
            pos += len(chunk)
