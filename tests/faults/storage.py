"""An in-process WebDAV-ish storage server for upload tests, with the faults they need.

* PUT stores (chunked bodies too) and honours ``If-None-Match: *`` (412 when the object exists)
  unless ``ignore_if_none_match``; ``put_status`` other than 2xx stores nothing.
* HEAD answers the size (plus ``head_size_delta``) and a ``Digest: adler32=`` when ``digest`` is set.
* DELETE removes (204, or 404 when there is nothing); ``deleted`` lists the paths asked.
* ``tokens``: when set, the bearer tokens accepted (403 otherwise); ``read_delay``: seconds to wait
  after each KiB of a PUT body (a reader at a crawl).
* ``methods`` and ``connections`` record what came in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Store(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.put_status = 201
        self.head_size_delta = 0
        self.digest: str | None = None
        self.ignore_if_none_match = False  # a server that overwrites whatever the request says
        self.tokens: set[str] | None = None
        self.read_delay = 0.0
        self.deleted: list[str] = []
        self.methods: list[str] = []
        self.connections: set[int] = set()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def running_store() -> Iterator[Store]:
    server = Store()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: Store
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", "0")
        self.end_headers()

    def _allowed(self) -> bool:
        self.server.methods.append(self.command)
        self.server.connections.add(id(self.connection))
        presented = self.headers.get("Authorization", "").removeprefix("Bearer ")
        return self.server.tokens is None or presented in self.server.tokens

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while size := int(self.rfile.readline().strip(), 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        length = int(self.headers["Content-Length"])
        data = b""
        while len(data) < length and (chunk := self.rfile.read(min(1024 if self.server.read_delay else length,
                                                                     length - len(data)))):
            data += chunk
            time.sleep(self.server.read_delay)
        return data

    def do_PUT(self) -> None:
        allowed = self._allowed()
        body = self._body()
        create_only = self.headers.get("If-None-Match") == "*" and not self.server.ignore_if_none_match
        if not allowed:
            self._answer(403)
        elif create_only and self.path in self.server.files:
            self._answer(412)
        else:
            if self.server.put_status < 300:
                self.server.files[self.path] = body
            self._answer(self.server.put_status)

    def do_HEAD(self) -> None:
        if not self._allowed():
            self._answer(403)
            return
        body = self.server.files.get(self.path)
        headers = {"Content-Length": str(len(body or b"") + self.server.head_size_delta)}
        if self.server.digest:
            headers["Digest"] = f"adler32={self.server.digest}"
        self._answer(404 if body is None else 200, headers)

    def do_DELETE(self) -> None:
        self.server.deleted.append(self.path)
        if not self._allowed():
            self._answer(403)
        else:
            self._answer(204 if self.server.files.pop(self.path, None) is not None else 404)

    def log_message(self, *args: Any) -> None:
        return None
