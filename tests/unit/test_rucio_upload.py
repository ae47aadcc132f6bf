"""The WebDAV uploader's steps and their order, over a stub rucio client and a local HTTP server."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from rucio.common import exception as rucio_exc

from datalakefs.catalogue.rucio import RucioCatalogue
from datalakefs.catalogue.rucio_upload import RucioUploader, check_did_name
from datalakefs.catalogue.upload import SpoolChangedError, UploadConflictError, UploadJob
from datalakefs.config import Config
from datalakefs.errors import InvalidNameError, TransferError


class Storage(ThreadingHTTPServer):
    """A WebDAV-ish server: PUT stores, HEAD answers the size (and a Digest when asked to)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.put_status = 201
        self.head_size_delta = 0
        self.digest: str | None = None


class _Handler(BaseHTTPRequestHandler):
    server: Storage

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.put_status < 300:
            self.server.files[self.path] = body
        self.send_response(self.server.put_status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        body = self.server.files.get(self.path)
        self.send_response(404 if body is None else 200)
        self.send_header("Content-Length", str(len(body or b"") + self.server.head_size_delta))
        if self.server.digest:
            self.send_header("Digest", f"adler32={self.server.digest}")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def storage() -> Iterator[Storage]:
    server = Storage()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class Client:
    """The rucio calls the uploader makes, against an in-memory catalogue."""

    host = "http://rucio.test"

    def __init__(self, base: str) -> None:
        self.base = base
        self.dids: dict[tuple[str, str], dict[str, Any]] = {}
        self.replicas: list[tuple[str, dict[str, Any]]] = []
        self.attached: list[tuple[str, str, list[dict[str, str]]]] = []
        self.rules: list[tuple[str, str]] = []
        self.calls: list[str] = []
        self.lose_add_replicas_answer = False
        self.session = type("S", (), {"close": lambda self: None})()

    def get_metadata(self, scope: str, name: str) -> dict[str, Any]:
        self.calls.append("get_metadata")
        try:
            return self.dids[(scope, name)]
        except KeyError:
            raise rucio_exc.DataIdentifierNotFound() from None

    def lfns2pfns(self, rse: str, lfns: list[str], operation: str, scheme: str) -> dict[str, str]:
        self.calls.append("lfns2pfns")
        if scheme != "http":
            raise rucio_exc.RSEProtocolNotSupported()
        return {lfn: f"{self.base}/{rse}/{lfn.replace(':', '/')}" for lfn in lfns}

    def add_replicas(self, rse: str, files: list[dict[str, Any]]) -> None:
        self.calls.append("add_replicas")
        for f in files:
            self.dids[(f["scope"], f["name"])] = {"did_type": "FILE", "bytes": f["bytes"], "adler32": f["adler32"]}
            self.replicas.append((rse, f))
        if self.lose_add_replicas_answer:
            self.lose_add_replicas_answer = False
            raise rucio_exc.FileReplicaAlreadyExists()

    def add_dataset(self, scope: str, name: str) -> None:
        self.calls.append("add_dataset")
        if (scope, name) in self.dids:
            raise rucio_exc.DataIdentifierAlreadyExists()
        self.dids[(scope, name)] = {"did_type": "DATASET"}

    def attach_dids(self, scope: str, name: str, dids: list[dict[str, str]]) -> None:
        self.calls.append("attach_dids")
        if any(a[2] == dids and a[:2] == (scope, name) for a in self.attached):
            raise rucio_exc.FileAlreadyExists()
        self.attached.append((scope, name, dids))

    def add_replication_rule(self, dids: list[dict[str, str]], copies: int, rse: str) -> None:
        self.calls.append("add_replication_rule")
        if (dids[0]["name"], rse) in self.rules:
            raise rucio_exc.DuplicateRule()
        self.rules.append((dids[0]["name"], rse))


@pytest.fixture
def client(storage: Storage) -> Client:
    return Client(f"http://127.0.0.1:{storage.server_address[1]}")


def uploader(client: Client, **options: Any) -> RucioUploader:
    config = Config(upload_rse="SCRATCH", **options)
    return RucioUploader(RucioCatalogue(config, client_factory=lambda: client), config)


def job(tmp_path: Path, data: bytes, name: str = "f.dat") -> UploadJob:
    path = tmp_path / f"{name}.spool"
    path.write_bytes(data)
    return UploadJob("user.x", "ds", name, path, len(data), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")


def test_a_new_file_is_stored_verified_then_registered_available_and_attached(
    client: Client, storage: Storage, tmp_path: Path
) -> None:
    steps: list[str] = []
    assert uploader(client, upload_rule_rse="TAPE").upload(job(tmp_path, b"payload"), steps.append) is True
    assert storage.files == {"/SCRATCH/user.x/f.dat": b"payload"}
    assert steps == ["stored", "registered", "attached"]
    assert client.replicas[0][1]["state"] == "A"
    assert client.calls.index("add_replicas") > client.calls.index("lfns2pfns")
    assert client.attached == [("user.x", "ds", [{"scope": "user.x", "name": "f.dat"}])]
    assert client.rules == [("f.dat", "SCRATCH"), ("f.dat", "TAPE")]


def test_a_rerun_after_registration_transfers_nothing_and_duplicates_nothing(
    client: Client, storage: Storage, tmp_path: Path
) -> None:
    work = job(tmp_path, b"payload")
    up = uploader(client)
    up.upload(work, lambda step: None)
    storage.files.clear()
    assert up.upload(work, lambda step: None) is False
    assert storage.files == {} and len(client.replicas) == 1 and len(client.attached) == 1 and len(client.rules) == 1


def test_other_content_under_the_name_is_a_conflict_and_nothing_is_written(
    client: Client, storage: Storage, tmp_path: Path
) -> None:
    client.dids[("user.x", "f.dat")] = {"did_type": "FILE", "bytes": 3, "adler32": "01234567"}
    with pytest.raises(UploadConflictError, match="other content"):
        uploader(client).upload(job(tmp_path, b"payload"), lambda step: None)
    assert storage.files == {} and client.replicas == []


def test_a_lost_add_replicas_answer_is_recognised_by_content(client: Client, tmp_path: Path) -> None:
    client.lose_add_replicas_answer = True
    assert uploader(client).upload(job(tmp_path, b"payload"), lambda step: None) is False
    assert len(client.replicas) == 1 and len(client.attached) == 1


@pytest.mark.parametrize("fault", ["put-500", "short-on-storage", "bad-digest"])
def test_storage_failures_register_nothing(client: Client, storage: Storage, tmp_path: Path, fault: str) -> None:
    if fault == "put-500":
        storage.put_status = 500
    elif fault == "short-on-storage":
        storage.head_size_delta = -1
    else:
        storage.digest = "00000000"
    with pytest.raises(TransferError):
        uploader(client).upload(job(tmp_path, b"payload"), lambda step: None)
    assert client.replicas == [] and "add_replicas" not in client.calls


def test_a_spool_file_that_changed_since_its_commit_is_detected(client: Client, tmp_path: Path) -> None:
    work = job(tmp_path, b"payload")
    work.path.write_bytes(b"PAYLOAD")
    with pytest.raises(SpoolChangedError):
        uploader(client).upload(work, lambda step: None)
    assert client.replicas == []


def test_did_names_follow_rucios_schema() -> None:
    for good in ("a", "file.root", "A-1_b.c", "x" * 250):
        check_did_name(good)
    for bad in ("", ".hidden", "-x", "a b", "é", "x" * 251):
        with pytest.raises(InvalidNameError):
            check_did_name(bad)


def test_without_an_upload_rse_nothing_happens(client: Client, tmp_path: Path) -> None:
    config = Config()
    with pytest.raises(TransferError, match="upload_rse"):
        RucioUploader(RucioCatalogue(config, client_factory=lambda: client), config).upload(
            job(tmp_path, b"x"), lambda step: None)
