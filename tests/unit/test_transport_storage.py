"""PUT, HEAD and DELETE of the storage transport against a local server: conditional PUTs, renewed
credentials, the deadline against slow servers, kept-alive connections, tokens kept off plain http."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from datalakefs.errors import AccessDeniedError, StorageConflictError, TransferError
from datalakefs.transport.deadlines import Deadline, DeadlineExceededError
from datalakefs.transport.http import NoAuth
from datalakefs.transport.storage import StorageClient, StoredObject
from datalakefs.transport.tokens import StorageAuth
from tests.unit.test_transport_http import Auth


class Store(ThreadingHTTPServer):
    """WebDAV-ish: PUT honours If-None-Match, HEAD gives the size, DELETE removes; ``tokens``, when
    set, are the bearer tokens it accepts (403 otherwise); ``read_delay`` slows its reading of PUT
    bodies to a crawl."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.tokens: set[str] | None = None
        self.read_delay = 0.0
        self.methods: list[str] = []
        self.connections: set[int] = set()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


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
        if self.server.read_delay:
            data = b""
            while len(data) < length and (chunk := self.rfile.read(min(1024, length - len(data)))):
                data += chunk
                time.sleep(self.server.read_delay)
            return data
        return self.rfile.read(length)

    def do_PUT(self) -> None:
        allowed = self._allowed()
        body = self._body()
        if not allowed:
            self._answer(403)
        elif self.headers.get("If-None-Match") == "*" and self.path in self.server.files:
            self._answer(412)
        else:
            self.server.files[self.path] = body
            self._answer(201)

    def do_HEAD(self) -> None:
        if not self._allowed():
            self._answer(403)
        elif self.path not in self.server.files:
            self._answer(404)
        else:
            self._answer(200, {"Content-Length": str(len(self.server.files[self.path]))})

    def do_DELETE(self) -> None:
        if not self._allowed():
            self._answer(403)
        else:
            self._answer(204 if self.server.files.pop(self.path, None) is not None else 404)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def store() -> Iterator[Store]:
    server = Store()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def client(auth: Any = None, deadline: Deadline | None = None) -> StorageClient:
    return StorageClient(auth or NoAuth(), deadline or Deadline(base=10, min_rate=1 << 20), stall=10)


def test_put_head_delete_and_the_connection_is_kept(store: Store) -> None:
    storage = client()
    url = f"{store.base}/SCRATCH/f"
    assert storage.head(url) is None
    storage.put(url, lambda: iter([b"hello ", b"world"]), 11)
    storage.put(f"{url}2", iter([b"chunked ", b"body"]), None)
    assert storage.head(url) == StoredObject(11, None)
    assert store.files == {"/SCRATCH/f": b"hello world", "/SCRATCH/f2": b"chunked body"}
    storage.delete(url)
    storage.delete(url)  # nothing there is fine
    assert storage.head(url) is None
    storage.close()
    assert len(store.connections) == 1


def test_a_put_never_overwrites(store: Store) -> None:
    storage = client()
    store.files["/SCRATCH/f"] = b"theirs"
    with pytest.raises(StorageConflictError, match="did not write"):
        storage.put(f"{store.base}/SCRATCH/f", lambda: iter([b"ours"]), 4)
    storage.close()
    assert store.files["/SCRATCH/f"] == b"theirs"


def put_token(path: Path, token: str) -> None:
    path.write_text(token)
    path.chmod(0o600)


def test_a_refusal_renews_the_credentials_and_sends_the_body_again(store: Store) -> None:
    store.tokens = {"new-token"}
    auth = Auth("old-token", "new-token")
    storage = client(auth)
    storage.put(f"{store.base}/f", lambda: iter([b"payload"]), 7)
    storage.close()
    assert store.files["/f"] == b"payload"
    assert store.methods == ["PUT", "PUT"] and auth.renewed == 1


def test_a_refusal_without_new_credentials_fails_with_its_reason(store: Store) -> None:
    store.tokens = {"new-token"}
    storage = client(Auth("old-token"))
    with pytest.raises(AccessDeniedError, match=r"HTTP 403.*refused our credentials"):
        storage.put(f"{store.base}/f", lambda: iter([b"payload"]), 7)
    storage.close()
    assert store.methods == ["PUT"] and store.files == {}


def test_a_body_that_cannot_be_sent_again_is_not_repeated(store: Store) -> None:
    store.tokens = {"new-token"}
    auth = Auth("old-token", "new-token")
    storage = client(auth)
    with pytest.raises(AccessDeniedError):
        storage.put(f"{store.base}/f", iter([b"streamed"]), None)
    storage.close()
    assert store.methods == ["PUT"] and auth.renewed == 0


def test_a_server_that_reads_at_a_crawl_is_abandoned_at_the_deadline_and_the_next_request_proceeds(
    store: Store,
) -> None:
    """1 KiB every 50 ms never stalls the socket; 8 MiB at the minimum of 16 MiB/s plus 0.5 s does
    not fit in it."""
    store.read_delay = 0.05
    storage = client(deadline=Deadline(base=0.5, min_rate=16 << 20))
    body = [b"x" * (1 << 20)] * 8
    with pytest.raises(DeadlineExceededError, match="minimum rate"):
        storage.put(f"{store.base}/slow", lambda: iter(body), 8 << 20)
    store.read_delay = 0.0
    storage.put(f"{store.base}/next", lambda: iter([b"fast"]), 4)
    storage.close()
    assert store.files["/next"] == b"fast"


def test_a_server_that_trickles_its_answer_is_abandoned_at_the_deadline() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            while not stop.wait(0.05):
                try:
                    connection.sendall(b"x")
                except OSError:
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        storage = client(deadline=Deadline(base=0.5, min_rate=1 << 20))
        with pytest.raises(DeadlineExceededError, match="minimum rate"):
            storage.delete(f"http://127.0.0.1:{listener.getsockname()[1]}/f")
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def test_a_token_is_kept_off_plain_http_to_a_remote_host_before_any_connection(tmp_path: Path) -> None:
    put_token(tmp_path / "bt", "home-token")
    storage = client(StorageAuth({"BEARER_TOKEN_FILE": str(tmp_path / "bt")}))
    with pytest.raises(AccessDeniedError, match="allow_token_over_http") as refused:
        storage.head("http://storage.invalid/f")  # never resolved: refused by the URL alone
    assert "home-token" not in str(refused.value)


def test_errors_name_the_url_without_its_query(store: Store) -> None:
    with pytest.raises(TransferError) as failed:
        client().put(f"http://127.0.0.1:1/f?authz=secret-{id(store)}", lambda: iter([b"x"]), 1)
    assert "secret" not in str(failed.value) and "127.0.0.1:1/f" in str(failed.value)
