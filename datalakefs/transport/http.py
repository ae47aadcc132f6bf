"""Closed-range HTTP GETs whose body goes straight into a sink, on the asyncio thread.

Contract of one transfer, :meth:`HttpTransport.fetch` (url, start, length, total, sink):

* Only a closed, in-bounds range ``bytes=start-(start+length-1)`` is ever sent, with ``0 <= start``,
  ``length > 0`` and ``start + length <= total``. XrdHttp 5.5.3 answers open-ended, suffix and past-EOF
  ranges wrongly, so anything else is a programming error (``ValueError``) and never reaches the wire.
* The reply must be ``206`` with ``Content-Range: bytes start-end/total`` exactly; ``200`` is accepted
  only when the range was the whole file. No ``Content-Encoding``; ``Content-Length``, when present,
  equals ``length``. A 206 whose body ends early, or runs past the range, is an error, never data.
* Every body byte goes to ``sink.write(offset, chunk)`` in order, with absolute file offsets, on the
  asyncio thread; ``sink.close()`` is called exactly once there, however the transfer ends, and before
  :meth:`HttpTransport.fetch` returns or raises (on the caller's thread instead when the transfer was
  cancelled before it started, so that nothing else can be touching the sink).
* A transfer during which no byte arrives for ``stall_timeout`` seconds fails as a timeout; connecting
  is bounded by ``connect_timeout``; with a ``deadline`` (:mod:`datalakefs.transport.deadlines`), a
  transfer that is not done within ``deadline.seconds(length)`` fails as a timeout too, however
  steadily its bytes trickle.
* Failures raise :class:`RangeReadError` (a ``TransferError``, so EIO) carrying a :class:`FailureKind`
  and whether another attempt may succeed. Messages name the URL without query string or user info,
  which may carry credentials.

Credentials come from a :class:`RequestAuth` asked on the asyncio thread for every request (headers and
TLS client context; it must be cheap and thread-safe): :class:`datalakefs.transport.tokens.StorageAuth`
in production. A 401 or 403 reply makes the transfer call ``auth.renew()`` once; when that yields new
credentials the request is repeated once with them, else the refusal stands.
"""

from __future__ import annotations

import asyncio
import enum
import re
import ssl
from collections.abc import Mapping
from typing import Protocol

import aiohttp

from datalakefs.errors import TransferError
from datalakefs.redaction import redact_text, redact_url
from datalakefs.transport.aio_bridge import AioBridge
from datalakefs.transport.deadlines import Deadline

__all__ = ["FailureKind", "HttpTransport", "NoAuth", "RangeReadError", "RangeSink", "RequestAuth", "redact_url"]

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class RangeSink(Protocol):
    """Where a transfer's body goes. Both methods are called on the asyncio thread only."""

    def write(self, offset: int, data: bytes) -> None:
        """Take ``data``, the body bytes at absolute file ``offset``; offsets are consecutive."""
        ...

    def close(self) -> None:
        """The transfer is over (complete or not); release what is held for it."""
        ...


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


class FailureKind(enum.Enum):
    SERVER_ERROR = "server error"
    DENIED = "access denied"
    NOT_FOUND = "not found"
    BAD_STATUS = "unexpected status"
    TIMEOUT = "timeout"
    CONNECTION = "connection failed"
    SHORT_BODY = "short body"
    BAD_REPLY = "invalid range reply"

    @property
    def retryable(self) -> bool:
        """Whether the same URL may answer correctly on another attempt."""
        return self not in (FailureKind.DENIED, FailureKind.NOT_FOUND, FailureKind.BAD_STATUS)


class RangeReadError(TransferError):
    """One attempt to read a range from one URL failed."""

    def __init__(self, kind: FailureKind, url: str, detail: str) -> None:
        super().__init__(f"{redact_url(url)}: {kind.value}: {redact_text(detail)}")
        self.kind = kind
        self.url = url


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


def check_reply(
    url: str,
    status: int,
    reason: str | None,
    headers: Mapping[str, str],
    content_length: int | None,
    start: int,
    end: int,
    total: int,
) -> None:
    """Raise :class:`RangeReadError` unless the reply's head is a valid answer to ``bytes=start-end``
    of a ``total``-byte file (``headers`` must look names up case-insensitively)."""
    length = end - start + 1
    if status == 200 and start == 0 and length == total:
        pass  # a server may ignore Range when the whole file was asked for
    elif status != 206:
        if status >= 500:
            kind = FailureKind.SERVER_ERROR
        elif status in (401, 403):
            kind = FailureKind.DENIED
        elif status in (404, 410):
            kind = FailureKind.NOT_FOUND
        else:
            kind = FailureKind.BAD_STATUS
        raise RangeReadError(kind, url, f"HTTP {status} {reason or ''}".rstrip())
    else:
        content_range = headers.get("Content-Range", "")
        match = _CONTENT_RANGE.match(content_range)
        if match is None or tuple(map(int, match.groups())) != (start, end, total):
            raise RangeReadError(
                FailureKind.BAD_REPLY,
                url,
                f"asked bytes {start}-{end}/{total}, got Content-Range {content_range!r}",
            )
    encoding = headers.get("Content-Encoding", "identity").lower()
    if encoding != "identity":
        raise RangeReadError(FailureKind.BAD_REPLY, url, f"Content-Encoding {encoding!r}")
    if content_length is not None and content_length != length:
        raise RangeReadError(FailureKind.BAD_REPLY, url, f"Content-Length {content_length}, expected {length}")
    if headers.get("Content-Type", "").lower().startswith("multipart/"):
        raise RangeReadError(FailureKind.BAD_REPLY, url, "multipart reply to a single range")
