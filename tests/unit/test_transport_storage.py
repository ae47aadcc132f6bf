"""PUT, HEAD and DELETE of the storage transport against a local server: conditional PUTs, renewed
credentials, the deadline against slow servers, kept-alive connections, tokens kept off plain http."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datalakefs.errors import AccessDeniedError, StorageConflictError, TransferError
from datalakefs.transport.deadlines import Deadline, DeadlineExceededError
from datalakefs.transport.http import NoAuth
from datalakefs.transport.storage import StorageClient, StoredObject
from datalakefs.transport.tokens import StorageAuth
from tests.faults.storage import Store, running_store
from tests.unit.test_transport_http import Auth


@pytest.fixture
def store() -> Iterator[Store]:
    with running_store() as server:
        yield server


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


def test_a_body_that_cannot_be_read_raises_its_own_error_not_a_transfer_error(store: Store) -> None:
    """A spool file that vanished is the uploader's to judge (it fails the file), not a storage
    error to retry."""
    storage = client()

    def missing() -> Iterator[bytes]:
        yield b"first chunk"
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(FileNotFoundError):
        storage.put(f"{store.base}/SCRATCH/gone", missing, 100)
    storage.close()


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


def test_a_connection_kept_by_one_thread_is_reused_by_the_next_request_on_another(store: Store) -> None:
    # trio hands each upload step to whichever worker thread is idle: the pool must not be per thread
    storage = client()
    url = f"{store.base}/SCRATCH/threads"
    storage.put(url, lambda: iter([b"x"]), 1)
    for _ in range(3):
        worker = threading.Thread(target=storage.head, args=(url,))
        worker.start()
        worker.join()
    storage.close()
    assert len(store.connections) == 1
