"""PUT, HEAD and DELETE of storage URLs, from worker threads: the write side of the one storage transport.

Reads and writes differ in shape, not in policy: range GETs run on the asyncio thread (``http.py``)
or the trio thread (``trio_http.py``), while uploads block a worker thread for a whole file. So this
module speaks HTTP/1.1 with the standard library's ``http.client`` (it owns the socket, which the
deadline needs), and takes everything else from the same places as the reads:

* credentials from a :class:`~datalakefs.transport.http.RequestAuth` (in a mount, the
  :class:`~datalakefs.transport.tokens.StorageAuth` the reads use): a 401 or 403 re-reads the token
  once and repeats the request when it changed, when the body can be sent again;
* whom https trusts, and the client certificate, from its ``ssl_context``;
* the :class:`~datalakefs.transport.deadlines.Deadline`: a request that moves ``n`` bytes is abandoned
  after ``deadline.seconds(n)``, and no socket operation waits longer than ``stall`` seconds.

A PUT never overwrites bytes it did not write: it is sent with ``If-None-Match: *``, so a server that
already holds an object at the URL answers 412, which is a :class:`StorageConflictError`. (A server
that ignores the header would overwrite: the uploader checks with :meth:`StorageClient.head` first.)

Connections are kept alive per (scheme, host, port, TLS context) in one pool for all worker threads: a
connection is taken out while one request uses it, so a thread never shares one, and the next request,
on whichever trio worker thread it runs, reuses it instead of paying a TCP and TLS handshake (per-thread
pools reused almost nothing: trio hands each call to any idle worker thread). A pooled connection the
server closed meanwhile is replaced once. Messages name URLs without query string or
user info (a signed URL's query may hold a credential).
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple
from urllib.parse import urlsplit

from datalakefs.errors import AccessDeniedError, DatalakeError, StorageConflictError, TransferError
from datalakefs.redaction import redact_url
from datalakefs.transport.deadlines import Deadline, DeadlineExceededError
from datalakefs.transport.http import RequestAuth

#: a body: a function that yields its chunks from the start, each time it is called (so that a
#: request refused for its credentials can be sent again), or a one-shot iterable of chunks
Body = Callable[[], Iterable[bytes]] | Iterable[bytes]

#: idle connections kept per server: enough for the uploads in flight (``upload_concurrency``, and the
#: sends while writing)
_MAX_IDLE: Final = 16
_STALE: Final = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class StoredObject(NamedTuple):
    """What a HEAD says about an object: its size and, when the server sends a ``Digest``, adler32."""

    size: int
    adler32: str | None


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    reason: str
    headers: Mapping[str, str]


class _Expired(Exception):
    """The request's deadline passed."""


class StorageClient:
    """Blocking PUT/HEAD/DELETE with the mount's credentials, CA policy and deadlines."""

    def __init__(self, auth: RequestAuth, deadline: Deadline, stall: float) -> None:
        self._auth = auth
        self._deadline = deadline
        self._stall = stall
        self._pool_lock = threading.Lock()
        self._pool: dict[tuple[object, ...], list[http.client.HTTPConnection]] = {}

    def put(self, url: str, body: Body, size: int | None) -> None:
        """Store ``body`` (``size`` bytes, or chunked when None) at ``url``, which must hold nothing yet."""
        headers = {"If-None-Match": "*", "Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        reply = self._request("PUT", url, headers, body, size or 0)
        if reply.status == 412:
            raise StorageConflictError(f"PUT {redact_url(url)}: the storage already holds an object there "
                                       "that this upload did not write; not overwritten")
        if reply.status not in (200, 201, 204):
            raise self._failure("PUT", url, reply)

    def head(self, url: str) -> StoredObject | None:
        """The object at ``url``, or None when there is none."""
        reply = self._request("HEAD", url, {"Want-Digest": "adler32"}, None, 0)
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise self._failure("HEAD", url, reply)
        try:
            size = int(reply.headers.get("Content-Length", ""))
        except ValueError:
            raise TransferError(f"HEAD {redact_url(url)}: no valid Content-Length") from None
        return StoredObject(size, _adler32_digest(reply.headers.get("Digest", "")))

    def delete(self, url: str) -> None:
        """Remove the object at ``url`` (none there is fine)."""
        reply = self._request("DELETE", url, {}, None, 0)
        if reply.status not in (200, 202, 204, 404):
            raise self._failure("DELETE", url, reply)

    def close(self) -> None:
        """Close the idle connections."""
        with self._pool_lock:
            pool, self._pool = self._pool, {}
        for connections in pool.values():
            for connection in connections:
                connection.close()

    # -- internals ---------------------------------------------------------------------------------

    def _failure(self, method: str, url: str, reply: Reply) -> DatalakeError:
        text = f"{method} {redact_url(url)}: HTTP {reply.status} {reply.reason}".rstrip()
        if reply.status in (401, 403):
            return AccessDeniedError(f"{text}: the storage refused our credentials")
        return TransferError(text)

    def _request(self, method: str, url: str, headers: dict[str, str], body: Body | None, size: int) -> Reply:
        replayable = body is None or callable(body)
        reply = self._once(method, url, headers, body, size)
        if reply.status in (401, 403) and replayable and self._auth.renew():
            reply = self._once(method, url, headers, body, size)
        return reply

    def _once(self, method: str, url: str, headers: dict[str, str], body: Body | None, size: int) -> Reply:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TransferError(f"{method} {redact_url(url)}: not an http(s) URL")
        all_headers = {**headers, **self._auth.headers(url)}
        context = self._auth.ssl_context(url)
        key = (parts.scheme, parts.hostname, parts.port, id(context))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        expires = time.monotonic() + self._deadline.seconds(size)
        pooled = self._take_idle(key)
        replayable = body is None or callable(body)
        try:
            if pooled is not None:
                try:
                    return self._exchange(pooled, key, method, target, all_headers, body, expires)
                except _STALE:
                    if not replayable:
                        raise
            connection = self._connect(parts.scheme, parts.hostname, parts.port, context)
            return self._exchange(connection, key, method, target, all_headers, body, expires)
        except (_Expired, TimeoutError):
            if time.monotonic() >= expires:
                raise DeadlineExceededError(f"{method} {redact_url(url)}: {self._deadline.explain(size)}") from None
            raise TransferError(f"{method} {redact_url(url)}: no progress for {self._stall:g} s") from None
        except _BodyUnreadable as exc:
            raise exc.error from None  # the caller's own file, not the storage: not a transfer error
        except ssl.SSLError as exc:
            raise TransferError(f"{method} {redact_url(url)}: TLS: {exc.reason or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(f"{method} {redact_url(url)} failed: {exc!r}") from None

    def _take_idle(self, key: tuple[object, ...]) -> http.client.HTTPConnection | None:
        """A kept-alive connection to the server ``key``, now this request's alone, or None."""
        with self._pool_lock:
            idle = self._pool.get(key)
            return idle.pop() if idle else None

    def _give_back(self, key: tuple[object, ...], connection: http.client.HTTPConnection) -> None:
        with self._pool_lock:
            idle = self._pool.setdefault(key, [])
            if len(idle) < _MAX_IDLE:
                idle.append(connection)
                return
        connection.close()

    def _connect(
        self, scheme: str, host: str, port: int | None, context: ssl.SSLContext | None
    ) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self._stall, context=context)
        return http.client.HTTPConnection(host, port, timeout=self._stall)

    def _exchange(
        self,
        connection: http.client.HTTPConnection,
        key: tuple[object, ...],
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: Body | None,
        expires: float,
    ) -> Reply:
        clean = False
        try:
            _arm(connection, self._stall, expires)
            connection.putrequest(method, target, skip_accept_encoding=True)
            chunked = body is not None and "Content-Length" not in headers
            for name, value in headers.items():
                connection.putheader(name, value)
            if chunked:
                connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            if body is not None:
                for chunk in _chunks(body):
                    if chunk:
                        _arm(connection, self._stall, expires)
                        # a chunk's frame goes out apart from it: no copy of megabytes per chunk
                        if chunked:
                            connection.send(b"%x\r\n" % len(chunk))
                        connection.send(chunk)
                        if chunked:
                            connection.send(b"\r\n")
                if chunked:
                    connection.send(b"0\r\n\r\n")
            _arm(connection, self._stall, expires)
            response = connection.getresponse()
            while response.read1(64 << 10):  # a short answer: drain it, within the deadline
                _arm(connection, self._stall, expires)
            response.read()  # nothing left: marks the response done, so the connection can be reused
            clean = not response.will_close
            return Reply(response.status, response.reason, {k: v for k, v in response.getheaders()})
        finally:
            if clean:
                self._give_back(key, connection)
            else:
                connection.close()


class _BodyUnreadable(Exception):
    """Reading the request body (a spool file) failed: that error, kept apart from the socket's."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _chunks(body: Body) -> Iterator[bytes]:
    try:
        yield from (body() if callable(body) else body)
    except OSError as exc:
        raise _BodyUnreadable(exc) from exc


def _arm(connection: http.client.HTTPConnection, stall: float, expires: float) -> None:
    """Bound the next socket operation by the stall timeout and what is left of the deadline
    (``sendall`` treats its timeout as a bound on the whole call)."""
    remaining = expires - time.monotonic()
    if remaining <= 0:
        raise _Expired
    timeout = min(stall, remaining)
    if connection.sock is None:
        connection.timeout = timeout
    else:
        connection.sock.settimeout(timeout)


def _adler32_digest(header: str) -> str | None:
    for part in header.split(","):
        algorithm, _, value = part.strip().partition("=")
        if algorithm.lower() == "adler32" and value:
            return value.lower().zfill(8)
    return None
