"""The HTTP/1.1 range-GET exchange of our own clients, without I/O: the request they send, how they
read a reply head, which replies they take, and how they reuse keep-alive connections.

Shared by :mod:`datalakefs.transport.trio_http` (small ranges, on trio) and
:mod:`datalakefs.transport.bulk_http` (bulk ranges received into the block buffers, on asyncio), so that
both hold the one contract of :meth:`datalakefs.transport.http.HttpTransport.fetch`. Only what these
clients take: one closed range per request, no pipelining, bodies of exactly ``Content-Length`` bytes
(a chunked reply or one without ``Content-Length`` is refused as ``BAD_REPLY``). The sink protocols,
the failure kinds and :func:`check_reply` are aiohttp's path's too (:mod:`datalakefs.transport.http`
re-exports them).
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable
from urllib.parse import SplitResult, urlsplit

from multidict import CIMultiDict

from datalakefs.errors import TransferError
from datalakefs.redaction import redact_text, redact_url

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
MAX_HEAD = 64 << 10  # a reply head longer than this is not a storage server's answer to a range GET

C = TypeVar("C")
K = TypeVar("K")


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


class RangeSink(Protocol):
    """Where a transfer's body goes. Both methods are called on the asyncio thread only."""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Take ``data``, the body bytes at absolute file ``offset``; offsets are consecutive. ``data``
        may be a view of the connection's receive buffer: valid during the call only."""
        ...

    def close(self) -> None:
        """The transfer is over (complete or not); release what is held for it."""
        ...


@runtime_checkable
class DrainingSink(RangeSink, Protocol):
    """A sink whose ``close`` may leave the last of its work to another thread (the cache writer's
    disk writes): the transfer is over once ``drained`` is done, which the asyncio side awaits
    without blocking its loop (the other transfers go on meanwhile)."""

    drained: concurrent.futures.Future[None]


@runtime_checkable
class BufferSink(RangeSink, Protocol):
    """A sink that lends its own memory for the body to be received into, without a copy."""

    def receive_buffer(self, offset: int) -> memoryview | None:
        """Writable memory for the body bytes from ``offset`` on (the next offset to come), or None
        when this part is to be given through ``write``."""
        ...

    def received(self, offset: int, count: int) -> None:
        """The first ``count`` bytes of the memory ``receive_buffer(offset)`` returned now hold the
        body bytes from ``offset`` on."""
        ...


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


class StaleConnection(Exception):
    """A pooled connection was closed by the server before it answered: try a fresh one."""


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    reason: str
    headers: CIMultiDict[str]
    keep_alive: bool  # the connection may carry the next request once this body was read


@dataclass(frozen=True, slots=True)
class RangeGet:
    """One range GET: bytes ``[start, start+length)`` of a ``total``-byte file at ``url``, into ``sink``."""

    url: str
    start: int
    length: int
    total: int
    sink: RangeSink

    def request(self, parts: SplitResult, headers: Mapping[str, str]) -> bytes:
        """The request, for the URL split as ``parts``, with ``headers`` (credentials) added."""
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}",
                 f"Range: bytes={self.start}-{self.start + self.length - 1}",
                 "Accept-Encoding: identity", "User-Agent: datalakefs"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def check(self, head: Head) -> None:
        """Raise :class:`RangeReadError` unless ``head`` announces exactly this range's bytes."""
        announced = head.headers.get("Content-Length")
        if "chunked" in head.headers.get("Transfer-Encoding", "").lower() or announced is None:
            raise RangeReadError(FailureKind.BAD_REPLY, self.url, "reply without Content-Length")
        try:
            content_length = int(announced)
        except ValueError:
            raise RangeReadError(FailureKind.BAD_REPLY, self.url, f"Content-Length {announced!r}") from None
        check_reply(self.url, head.status, head.reason, head.headers, content_length, self.start,
                    self.start + self.length - 1, self.total)


@functools.lru_cache(maxsize=1024)
def split_url(url: str, schemes: tuple[str, ...]) -> tuple[SplitResult, tuple[str, int]] | None:
    """The split URL and its (host, port) when it has one of ``schemes`` and no user info, else None
    (also for a port that is not a number: aiohttp reports that). Cached: a reader asks for the same
    URL each time, and a split URL parses its hostname and port anew at each access."""
    parts = urlsplit(url)
    if parts.scheme not in schemes or "@" in parts.netloc or parts.hostname is None:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return parts, (parts.hostname, port)


def head_end(buffer: bytearray, url: str) -> int:
    """Where the head in ``buffer`` ends (the index of its blank line), or -1 while it is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0 and len(buffer) > MAX_HEAD:
        raise RangeReadError(FailureKind.BAD_REPLY, url, "reply head too long")
    return end


def parse_head(raw: bytes, url: str) -> Head:
    """The head ``raw`` (status line and header lines, without the blank line)."""
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise RangeReadError(FailureKind.BAD_REPLY, url, f"status line {lines[0]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise RangeReadError(FailureKind.BAD_REPLY, url, f"header line {line!r}")
        headers.add(name.strip(), value.strip())
    keep_alive = version == "HTTP/1.1" and headers.get("Connection", "").lower() != "close"
    return Head(int(code), reason, headers, keep_alive)


class IdlePool(Generic[K, C]):
    """Kept-alive connections waiting for their next request, at most ``max_idle`` per key."""

    def __init__(self, max_idle: int) -> None:
        self._max_idle = max_idle
        self._idle: dict[K, list[C]] = {}

    def take(self, key: K) -> C | None:
        connections = self._idle.get(key)
        return connections.pop() if connections else None

    def give(self, key: K, connection: C) -> bool:
        """Keep ``connection``; False when the pool is full (the caller closes it)."""
        connections = self._idle.setdefault(key, [])
        if len(connections) >= self._max_idle:
            return False
        connections.append(connection)
        return True

    def drain(self) -> list[C]:
        """Every idle connection, leaving the pool empty (to close them)."""
        idle, self._idle = self._idle, {}
        return [connection for connections in idle.values() for connection in connections]


async def exchange_once(
    pooled: C | None,
    open_fresh: Callable[[], Awaitable[C]],
    exchange: Callable[[C, bool], Awaitable[None]],
    url: str,
) -> None:
    """Run ``exchange(connection, reused)`` on ``pooled`` if any, and on a fresh connection instead when
    the pooled one turns out closed (:class:`StaleConnection`): a server may close an idle connection
    at any time, so that is not a failure of the transfer; a fresh one closing is."""
    if pooled is not None:
        try:
            await exchange(pooled, True)
            return
        except StaleConnection:
            pass
    connection = await open_fresh()
    try:
        await exchange(connection, False)
    except StaleConnection:
        raise RangeReadError(FailureKind.CONNECTION, url, "connection closed before a reply") from None
