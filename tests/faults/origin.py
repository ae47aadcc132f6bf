"""An in-process HTTP/1.1 origin serving files with range support, injecting faults on demand.

* Serves ``files`` (name -> bytes) at ``http://127.0.0.1:<port>/<name>`` with keep-alive. A closed,
  in-bounds ``Range`` gets 206 and ``Content-Range``; no ``Range`` gets 200 and the whole file; any other
  range (open-ended, suffix, past the end, several) is answered 416 and recorded in ``violations``,
  because XrdHttp would answer it wrongly and the client must never send one.
* Every GET is recorded (:class:`Request`: path, range, headers) so tests count GETs per range.
* ``fault_rate`` of the GETs (seeded RNG) get one of ``faults``:

  - ``status``: 503;
  - ``stall``: headers and half the body, then silence until ``stall`` seconds pass or the origin stops;
  - ``reset``: headers and half the body, then a TCP reset;
  - ``short``: full ``Content-Length`` announced, half the body, connection closed;
  - ``range``: ``Content-Range`` and body of the range shifted by one byte;
  - ``corrupt``: right headers, one body byte flipped (only the whole-file check can see it; not in
    the default mix);
  - ``trickle``: right headers, then the body one byte every ``trickle`` seconds, so that the client
    never stalls and only a deadline stops it (not in the default mix).

  ``deny`` maps paths to a status (401, 403, 404...) answered to every GET of them.
* ``redirect`` maps paths to the path every GET of them is redirected to (302, ``Location``).
* ``tls``: a server-side TLS context: the origin serves ``https://`` with it.
* ``bearer``: when set, the accepted tokens (a mutable set the test may change); a request without
  ``Authorization: Bearer <one of them>`` is answered 403, as XRootD answers a missing or expired token.
* Bounded: one thread per connection, socket timeouts, and :meth:`FaultyOrigin.stop` shuts every
  connection down and joins the threads.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import socketserver
import ssl
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from datalakefs.transport.http import FailureKind

DEFAULT_FAULTS = ("status", "stall", "reset", "short", "range")
#: each default fault, and the failure kinds a client may report it as (a reset can come mid-body)
FAULT_KINDS = [
    ("status", {FailureKind.SERVER_ERROR}),
    ("stall", {FailureKind.TIMEOUT}),
    ("reset", {FailureKind.CONNECTION, FailureKind.SHORT_BODY}),
    ("short", {FailureKind.SHORT_BODY}),
    ("range", {FailureKind.BAD_REPLY}),
]
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


@dataclass(frozen=True)
class Request:
    path: str
    range: str | None
    headers: Mapping[str, str]
    fault: str | None


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True

    def __init__(self, origin: FaultyOrigin) -> None:
        self.origin = origin
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-body and injected resets are expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30

    def setup(self) -> None:
        super().setup()
        self.server.origin._track(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.origin._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.origin._serve(self, head=False)

    def do_HEAD(self) -> None:
        self.server.origin._serve(self, head=True)


class FaultyOrigin:
    """See the module docstring. Use as a context manager, or ``start()``/``stop()``."""

    def __init__(
        self,
        files: Mapping[str, bytes],
        *,
        fault_rate: float = 0.0,
        faults: Iterable[str] = DEFAULT_FAULTS,
        seed: int = 0,
        stall: float = 10.0,
        trickle: float = 1.0,
        latency: float = 0.0,
        deny: Mapping[str, int] | None = None,
        bearer: set[str] | None = None,
        redirect: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.files = dict(files)
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        self.stall = stall
        self.trickle = trickle
        self.latency = latency
        self.deny = dict(deny or {})
        self.bearer = bearer
        self.redirect = dict(redirect or {})
        self.tls = tls
        self.requests: list[Request] = []
        self.violations: list[str] = []
        self.connections = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FaultyOrigin:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base(self) -> str:
        assert self._server is not None
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def start(self) -> None:
        self._server = _Server(self)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        thread.join()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        server.server_close()  # joins the connection threads
        self._server = None

    def drop_connections(self) -> None:
        """Close every open connection, as a server does with idle keep-alive connections."""
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def gets(self, path: str | None = None) -> Counter[str | None]:
        """How many GETs each range got (of ``path``, or of every file)."""
        with self._lock:
            return Counter(r.range for r in self.requests if path is None or r.path == path)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)
            self.connections += 1

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)

    def _pick_fault(self) -> str | None:
        with self._lock:
            if self.faults and self._rng.random() < self.fault_rate:
                return self._rng.choice(self.faults)
            return None

    def _serve(self, handler: _Handler, head: bool) -> None:
        path = urlsplit(handler.path).path.lstrip("/")
        data = self.files.get(path)
        range_header = handler.headers.get("Range")
        fault = None if head else self._pick_fault()
        if not head:
            with self._lock:
                self.requests.append(Request(path, range_header, dict(handler.headers.items()), fault))
        if self.latency:
            self._stopping.wait(self.latency)
        presented = handler.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.bearer is not None and presented not in self.bearer:
            self._reply(handler, 403, {}, b"", head)
            return
        if path in self.redirect:
            self._reply(handler, 302, {"Location": f"/{self.redirect[path]}"}, b"", head)
            return
        if data is None or path in self.deny:
            self._reply(handler, self.deny.get(path, 404), {}, b"", head)
            return
        if range_header is None:
            self._reply(handler, 200, {}, data, head)
            return
        match = _RANGE.match(range_header)
        if match is None or not int(match[1]) <= int(match[2]) < len(data):
            with self._lock:
                self.violations.append(range_header)
            self._reply(handler, 416, {"Content-Range": f"bytes */{len(data)}"}, b"", head)
            return
        start, end = int(match[1]), int(match[2])
        if fault == "status":
            self._reply(handler, 503, {}, b"injected", head)
            return
        if fault == "range":
            shift = 1 if end + 1 < len(data) else -1
            start, end = start + shift, end + shift
        body = data[start : end + 1]
        if fault == "corrupt":
            flip = self._rng.randrange(len(body))
            body = body[:flip] + bytes([body[flip] ^ 0x5A]) + body[flip + 1 :]
        headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
        if fault == "trickle":
            self._send_headers(handler, 206, headers, len(body))
            handler.close_connection = True
            for index in range(len(body)):
                if self._stopping.wait(self.trickle):
                    return
                handler.wfile.write(body[index : index + 1])
                handler.wfile.flush()
            return
        if fault in ("stall", "reset", "short"):
            self._send_headers(handler, 206, headers, len(body))
            handler.wfile.write(body[: len(body) // 2])
            handler.close_connection = True
            if fault == "stall":
                self._stopping.wait(self.stall)
            elif fault == "reset":
                handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                handler.connection.close()
            return
        self._reply(handler, 206, headers, body, head)

    @staticmethod
    def _send_headers(handler: _Handler, status: int, headers: Mapping[str, str], length: int) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()

    def _reply(
        self, handler: _Handler, status: int, headers: Mapping[str, str], body: bytes, head: bool
    ) -> None:
        self._send_headers(handler, status, headers, len(body))
        if not head:
            handler.wfile.write(body)
