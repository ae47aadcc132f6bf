"""Closed-range HTTP GETs whose body goes straight into a sink, on the asyncio thread.

Contract of one transfer, :meth:`HttpTransport.fetch` (url, start, length, total, sink):

* Only a closed, in-bounds range ``bytes=start-(start+length-1)`` is ever sent, with ``0 <= start``,
  ``length > 0`` and ``start + length <= total``. XrdHttp 5.5.3 answers open-ended, suffix and past-EOF
  ranges wrongly, so anything else is a programming error (``ValueError``) and never reaches the wire.
* The reply must be ``206`` with ``Content-Range: bytes start-end/total`` exactly; ``200`` is accepted
  only when the range was the whole file. No ``Content-Encoding``; ``Content-Length``, when present,
  equals ``length``. A 206 whose body ends early, or runs past the range, is an error, never data.
* Every body byte goes to ``sink.write(offset, chunk)`` (or, for a :class:`BufferSink`, is received
  into the memory it lends and announced by ``sink.received(offset, count)``) in order, with absolute
  file offsets, on the asyncio thread; ``sink.close()`` is called exactly once there, however the
  transfer ends, and before :meth:`HttpTransport.fetch` returns or raises (on the caller's thread
  instead when the transfer was cancelled before it started, so that nothing else can be touching
  the sink); for a :class:`DrainingSink`, whose ``close`` leaves work to another thread, the fetch
  returns or raises only once that work is done (its ``drained``), awaited without blocking the loop.
* A transfer during which no byte arrives for ``stall_timeout`` seconds fails as a timeout; connecting
  is bounded by ``connect_timeout``; with a ``deadline`` (:mod:`datalakefs.transport.deadlines`), a
  transfer that is not done within ``deadline.seconds(length)`` fails as a timeout too, however
  steadily its bytes trickle.
* Failures raise :class:`RangeReadError` (a ``TransferError``, so EIO) carrying a :class:`FailureKind`
  and whether another attempt may succeed. Messages name the URL without query string or user info,
  which may carry credentials.

Plain ``http://`` and ``https://`` URLs are read by :class:`~datalakefs.transport.bulk_http.BulkRangeClient`
(our own HTTP/1.1 client on the same loop, which receives a body straight into the memory a
:class:`BufferSink` lends); aiohttp reads the others (user info in the URL) and any reply that redirects.

Credentials come from a :class:`RequestAuth` asked on the asyncio thread for every request (headers and
TLS client context; it must be cheap and thread-safe): :class:`datalakefs.transport.tokens.StorageAuth`
in production. A 401 or 403 reply makes the transfer call ``auth.renew()`` once; when that yields new
credentials the request is repeated once with them, else the refusal stands.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
from collections.abc import Mapping
from typing import Protocol

import aiohttp

from datalakefs.redaction import redact_url
from datalakefs.transport.aio_bridge import AioBridge
from datalakefs.transport.bulk_http import BulkRangeClient, Redirected
from datalakefs.transport.deadlines import Deadline
from datalakefs.transport.http1 import (
    BufferSink,
    DrainingSink,
    FailureKind,
    RangeReadError,
    RangeSink,
    check_reply,
)

__all__ = [
    "BufferSink", "FailureKind", "HttpTransport", "NoAuth", "RangeReadError", "RangeSink", "RequestAuth", "check_reply",
    "redact_url",
]

async def _until_drained(drained: concurrent.futures.Future[None]) -> None:
    """Until the work ``close`` left to another thread is done, even when cancelled meanwhile (then
    CancelledError after): a transfer never returns while its last blocks may still land, and the
    loop serves the other transfers meanwhile (a wait in ``close`` would stop them all)."""
    waiting = asyncio.wrap_future(drained)
    cancelled = False
    while not waiting.done():
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


class RequestAuth(Protocol):
    """Credentials of data requests; every method is called on the asyncio thread."""

    def headers(self, url: str) -> Mapping[str, str]:
        """Extra request headers for ``url`` (``Authorization``)."""
        ...

    def ssl_context(self, url: str) -> ssl.SSLContext | None:
        """A TLS context presenting a client certificate for ``url``, or None for the default."""
        ...

    def renew(self) -> bool:
        """Look for newer credentials after a refusal; True when there are different ones to try."""
        ...


class NoAuth:
    """Anonymous requests."""

    def headers(self, url: str) -> Mapping[str, str]:
        return {}

    def ssl_context(self, url: str) -> ssl.SSLContext | None:
        return None

    def renew(self) -> bool:
        return False


class HttpTransport:
    """Range reads over one :class:`AioBridge`."""

    def __init__(
        self,
        bridge: AioBridge,
        *,
        stall_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        auth: RequestAuth | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self._bridge = bridge
        self._deadline = deadline
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=stall_timeout
        )
        self._auth: RequestAuth = auth if auth is not None else NoAuth()
        self.renewals = 0  # requests repeated with renewed credentials
        self._bulk = BulkRangeClient(stall_timeout=stall_timeout, connect_timeout=connect_timeout)
        bridge.on_close(self._bulk.close)

    async def fetch(self, url: str, start: int, length: int, total: int, sink: RangeSink) -> None:
        """Read bytes ``[start, start+length)`` of a ``total``-byte file at ``url`` into ``sink``."""
        if start < 0 or length <= 0 or start + length > total:
            sink.close()
            raise ValueError(f"range {start}+{length} is not a closed range inside a {total}-byte file")
        started: list[bool] = []
        try:
            await self._bridge.run(self._get, url, start, length, total, sink, started)
        finally:
            if not started:  # cancelled or shut down before the coroutine ran: nothing else will close it
                sink.close()

    async def _get(
        self, url: str, start: int, length: int, total: int, sink: RangeSink, started: list[bool]
    ) -> None:
        started.append(True)
        try:
            try:
                await self._attempt(url, start, length, total, sink)
            except RangeReadError as exc:
                # nothing reached the sink: a refusal is detected before the body is read
                if exc.kind is not FailureKind.DENIED or not self._auth.renew():
                    raise
                self.renewals += 1
                await self._attempt(url, start, length, total, sink)
        finally:
            sink.close()
            if isinstance(sink, DrainingSink):
                await _until_drained(sink.drained)

    async def _attempt(self, url: str, start: int, length: int, total: int, sink: RangeSink) -> None:
        limit = asyncio.timeout(None if self._deadline is None else self._deadline.seconds(length))
        try:
            async with limit:
                await self._transfer(url, start, length, total, sink)
        except RangeReadError:
            raise
        except TimeoutError as exc:
            if limit.expired() and self._deadline is not None:
                raise RangeReadError(FailureKind.TIMEOUT, url, self._deadline.explain(length)) from None
            raise RangeReadError(FailureKind.TIMEOUT, url, f"no data for a while ({exc!r})") from None
        except aiohttp.ClientPayloadError as exc:
            raise RangeReadError(FailureKind.SHORT_BODY, url, str(exc) or repr(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise RangeReadError(FailureKind.CONNECTION, url, str(exc) or repr(exc)) from None

    async def _transfer(self, url: str, start: int, length: int, total: int, sink: RangeSink) -> None:
        if self._bulk.supports(url):
            try:
                await self._bulk.fetch(url, start, length, total, sink, dict(self._auth.headers(url)),
                                       self._auth.ssl_context(url))
                return
            except Redirected:
                pass  # nothing reached the sink; aiohttp follows redirects
        end = start + length - 1
        headers = {**self._auth.headers(url), "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
        context = self._auth.ssl_context(url)
        async with self._bridge.session.get(
            url, headers=headers, timeout=self._timeout, ssl=True if context is None else context
        ) as resp:
            try:
                check_reply(url, resp.status, resp.reason, resp.headers, resp.content_length, start, end,
                            total)
                pos = start
                limit = start + length
                # each chunk as the connection received it: iter_any would join the chunks buffered
                # while the sink was busy into one more copy of every byte
                async for chunk, _ in resp.content.iter_chunks():
                    if not chunk:  # the end of a chunk of a chunked body
                        continue
                    if pos + len(chunk) > limit:
                        raise RangeReadError(FailureKind.BAD_REPLY, url, f"body longer than {length} bytes")
                    sink.write(pos, chunk)
                    pos += len(chunk)
                if pos != limit:
                    raise RangeReadError(
                        FailureKind.SHORT_BODY, url, f"body ended after {pos - start} of {length} bytes"
                    )
            except BaseException:
                resp.close()  # never return a half-read connection to the pool
                raise
