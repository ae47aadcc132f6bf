"""Small closed-range GETs on the trio thread, over plain HTTP/1.1 keep-alive connections.

Why: a piece read (a few KiB for a random ``pread``) through aiohttp on its asyncio thread pays two
cross-thread wake-ups and aiohttp's per-request work, several times the network's own latency on a
local link. Trio sockets answer it on the thread that serves FUSE. Bulk transfers stay with
:class:`~datalakefs.transport.http.HttpTransport` (aiohttp), and so does any URL this client does not
take (:meth:`TrioRangeClient.supports`: only ``http://`` without user info; TLS, proxies, redirects and
credentials in URLs are aiohttp's). Requests carry the same :class:`~datalakefs.transport.http.RequestAuth`
headers as bulk transfers, and a refusal (401/403) renews the credentials once, as there.

The contract of :meth:`TrioRangeClient.fetch` is :meth:`HttpTransport.fetch`'s: only a closed, in-bounds
range is sent; the reply head is checked by :func:`~datalakefs.transport.http.check_reply`; the body must
have exactly ``Content-Length`` = ``length`` bytes (no chunked encoding); every byte goes to
``sink.write`` in order and ``sink.close`` is called once; no byte for ``stall_timeout`` seconds is a
timeout, and so is a fetch not done within its ``deadline``; failures raise ``RangeReadError``. A
connection goes back to the pool only after a complete, clean exchange; a pooled connection the server
closed meanwhile is replaced once, transparently.
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

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
)

_RECEIVE = 256 << 10


class _Connection:
    __slots__ = ("buffer", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()


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
        parts = urlsplit(url)
        return parts.scheme == "http" and "@" not in parts.netloc and parts.hostname is not None

    async def fetch(self, url: str, start: int, length: int, total: int, sink: RangeSink) -> None:
        """Read bytes ``[start, start+length)`` of a ``total``-byte file at ``url`` into ``sink``."""
        try:
            if start < 0 or length <= 0 or start + length > total:
                raise ValueError(f"range {start}+{length} is not a closed range inside a {total}-byte file")
            if not self.supports(url):
                raise ValueError(f"{url.split(':', 1)[0]}: URL not handled by the trio client")
            with trio.move_on_after(self._deadline.seconds(length) if self._deadline else float("inf")) as limit:
                try:
                    await self._get(url, start, length, total, sink)
                except RangeReadError as exc:
                    # a refusal is detected before any byte reaches the sink, so the GET can be repeated
                    if exc.kind is not FailureKind.DENIED or not self._auth.renew():
                        raise
                    await self._get(url, start, length, total, sink)
            if limit.cancelled_caught and self._deadline is not None:
                raise RangeReadError(FailureKind.TIMEOUT, url, self._deadline.explain(length))
        finally:
            sink.close()

    async def _get(self, url: str, start: int, length: int, total: int, sink: RangeSink) -> None:
        parts = urlsplit(url)
        address = (parts.hostname or "", parts.port or 80)
        get = RangeGet(url, start, length, total, sink)
        exchange = functools.partial(self._exchange, address, get, get.request(parts, self._auth.headers(url)))
        await exchange_once(self._idle.take(address), functools.partial(self._open, address, url), exchange, url)

    async def aclose(self) -> None:
        for connection in self._idle.drain():
            await trio.aclose_forcefully(connection.stream)

    async def _open(self, address: tuple[str, int], url: str) -> _Connection:
        try:
            with trio.fail_after(self._connect):
                return _Connection(await trio.open_tcp_stream(*address))
        except (OSError, trio.TooSlowError) as exc:
            raise RangeReadError(FailureKind.CONNECTION, url, str(exc) or repr(exc)) from None

    async def _receive(self, connection: _Connection, url: str) -> bytes:
        try:
            with trio.fail_after(self._stall):
                return await connection.stream.receive_some(_RECEIVE)
        except trio.TooSlowError:
            raise RangeReadError(FailureKind.TIMEOUT, url, f"no data for {self._stall:g} s") from None

    async def _exchange(
        self, address: tuple[str, int], get: RangeGet, request: bytes, connection: _Connection, reused: bool
    ) -> None:
        clean = False
        try:
            try:
                await connection.stream.send_all(request)
                head = await self._read_head(connection, get.url, reused)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if reused:
                    raise StaleConnection from None
                raise RangeReadError(FailureKind.CONNECTION, get.url, str(exc) or repr(exc)) from None
            get.check(head)
            await self._body(connection, get.url, get.start, get.length, get.sink)
            clean = head.keep_alive and not connection.buffer
        finally:
            if not (clean and self._idle.give(address, connection)):
                await trio.aclose_forcefully(connection.stream)

    async def _read_head(self, connection: _Connection, url: str, reused: bool) -> Head:
        buffer = connection.buffer
        while (end := head_end(buffer, url)) < 0:
            chunk = await self._receive(connection, url)
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
                    chunk = await self._receive(connection, url)
                except (OSError, trio.BrokenResourceError) as exc:
                    raise RangeReadError(FailureKind.SHORT_BODY, url,
                                         f"body ended after {pos - start} of {length} bytes ({exc!r})") from None
                if not chunk:
                    raise RangeReadError(FailureKind.SHORT_BODY, url,
                                         f"body ended after {pos - start} of {length} bytes")
                if len(chunk) > limit - pos:
                    raise RangeReadError(FailureKind.BAD_REPLY, url, f"body longer than {length} bytes")
            sink.write(pos, chunk)
            pos += len(chunk)
