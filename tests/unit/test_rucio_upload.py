"""The WebDAV uploader's steps and their order, over a stub rucio client and a local HTTP server."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from rucio.common import exception as rucio_exc

from datalakefs.catalogue.rucio import RucioCatalogue
from datalakefs.catalogue.rucio_upload import RucioUploader, check_did_name
from datalakefs.catalogue.upload import (
    Registration,
    SpoolChangedError,
    TransitionHooks,
    UploadConflictError,
    UploadJob,
)
from datalakefs.config import Config
from datalakefs.errors import CatalogueUnavailableError, InvalidNameError, TransferError
from datalakefs.transport.deadlines import Deadline
from datalakefs.transport.http import NoAuth
from datalakefs.transport.storage import StorageClient
from tests.faults.storage import Store, running_store


@pytest.fixture
def storage() -> Iterator[Store]:
    with running_store() as server:
        yield server


class Client:
    """The rucio calls the uploader makes, against an in-memory catalogue."""

    host = "http://rucio.test"
    account = "jdoe"

    def __init__(self, base: str) -> None:
        self.base = base
        self.dids: dict[tuple[str, str], dict[str, Any]] = {}
        self.replicas: list[tuple[str, dict[str, Any]]] = []
        self.attached: list[tuple[str, str, dict[str, str]]] = []
        self.rules: list[tuple[str, str]] = []  # (DID name, RSE expression)
        self.rule_expiry: dict[tuple[str, str], str] = {}
        self.calls: list[str] = []
        self.lose_add_replicas_answer = False
        self.down = False
        self.session = type("S", (), {"close": lambda self: None})()

    def get_metadata(self, scope: str, name: str) -> dict[str, Any]:
        self.calls.append("get_metadata")
        try:
            return self.dids[(scope, name)]
        except KeyError:
            raise rucio_exc.DataIdentifierNotFound() from None

    def get_metadata_bulk(self, dids: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
        self.calls.append("get_metadata_bulk")
        self._fail_if_down()
        for did in dids:
            if (did["scope"], did["name"]) in self.dids:
                yield {**did, **self.dids[(did["scope"], did["name"])]}

    def lfns2pfns(self, rse: str, lfns: list[str], operation: str, scheme: str) -> dict[str, str]:
        self.calls.append("lfns2pfns")
        if scheme != "http":
            raise rucio_exc.RSEProtocolNotSupported()
        return {lfn: f"{self.base}/{rse}/{lfn.replace(':', '/')}" for lfn in lfns}

    def add_replicas(self, rse: str, files: list[dict[str, Any]]) -> None:
        """One transaction, like Rucio's: any existing replica refuses the whole call."""
        self.calls.append("add_replicas")
        self._fail_if_down()
        if any((f["scope"], f["name"]) in self.dids for f in files):
            raise rucio_exc.FileReplicaAlreadyExists()
        for f in files:
            self.dids[(f["scope"], f["name"])] = {"did_type": "FILE", "bytes": f["bytes"], "adler32": f["adler32"]}
            self.replicas.append((rse, f))
        if self.lose_add_replicas_answer:
            self.lose_add_replicas_answer = False
            raise requests.ConnectionError("connection reset")

    def add_dataset(self, scope: str, name: str, rules: list[dict[str, Any]] | None = None) -> None:
        """The dataset and its rules, in one transaction."""
        self.calls.append("add_dataset")
        if (scope, name) in self.dids:
            raise rucio_exc.DataIdentifierAlreadyExists()
        assert all(rule["account"] == self.account and rule["grouping"] == "DATASET" for rule in rules or [])
        self.dids[(scope, name)] = {"did_type": "DATASET"}
        self.rules.extend((name, rule["rse_expression"]) for rule in rules or [])

    def list_did_rules(self, scope: str, name: str) -> Iterator[dict[str, Any]]:
        self.calls.append("list_did_rules")
        for did, rse in self.rules:
            if did == name:
                yield {"rse_expression": rse, "expires_at": self.rule_expiry.get((did, rse))}

    def attach_dids_to_dids(self, attachments: list[dict[str, Any]], ignore_duplicate: bool) -> None:
        self.calls.append("attach_dids_to_dids")
        assert ignore_duplicate
        for attachment in attachments:
            for did in attachment["dids"]:
                if (attachment["scope"], attachment["name"], did) not in self.attached:
                    self.attached.append((attachment["scope"], attachment["name"], did))

    def add_replication_rule(self, dids: list[dict[str, str]], copies: int, rse: str) -> None:
        """One transaction: a file that has its rule already refuses the whole call."""
        self.calls.append("add_replication_rule")
        if any((did["name"], rse) in self.rules for did in dids):
            raise rucio_exc.DuplicateRule()
        self.rules.extend((did["name"], rse) for did in dids)

    def _fail_if_down(self) -> None:
        if self.down:
            raise requests.ConnectionError("connection refused")


@pytest.fixture
def client(storage: Store) -> Client:
    return Client(f"http://127.0.0.1:{storage.server_address[1]}")


class Steps(TransitionHooks):
    """The transitions the uploader reached, in order."""

    def __init__(self) -> None:
        self.reached_in_order: list[str] = []

    def reached(self, transition: str) -> None:
        self.reached_in_order.append(transition)


_CLIENTS: list[StorageClient] = []


@pytest.fixture(autouse=True)
def _close_storage_clients() -> Iterator[None]:
    """The storage transport keeps connections alive for the thread's next upload: closed here."""
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def storage_client() -> StorageClient:
    made = StorageClient(NoAuth(), Deadline(base=10, min_rate=1 << 20), stall=10)
    _CLIENTS.append(made)
    return made


def uploader(client: Client, hooks: TransitionHooks | None = None, **options: Any) -> RucioUploader:
    config = Config(upload_rse="SCRATCH", **options)
    return RucioUploader(RucioCatalogue(config, client_factory=lambda: client), config, storage_client(), hooks)


def job(tmp_path: Path, data: bytes, name: str = "f.dat") -> UploadJob:
    path = tmp_path / f"{name}.spool"
    path.write_bytes(data)
    return UploadJob("user.x", "ds", name, path, len(data), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")


def upload(up: RucioUploader, work: UploadJob) -> bool:
    """The outbox's sequence for one file; True when its bytes were stored by this call."""
    (url,) = up.locate([work])
    if isinstance(url, Exception):
        raise url
    if url is not None:
        up.store(work, url)
    (error,) = up.register([Registration(work, stored=url is not None)])
    if error is not None:
        raise error
    return url is not None


def test_a_new_file_is_stored_verified_then_registered_available_and_attached(
    client: Client, storage: Store, tmp_path: Path
) -> None:
    steps = Steps()
    assert upload(uploader(client, steps, upload_rule_rse="TAPE"), job(tmp_path, b"payload")) is True
    assert storage.files == {"/SCRATCH/user.x/f.dat": b"payload"}
    assert steps.reached_in_order == ["upload-registered", "upload-attached"]
    assert client.replicas[0][1]["state"] == "A"
    assert client.calls.index("add_replicas") > client.calls.index("lfns2pfns")
    assert client.attached == [("user.x", "ds", {"scope": "user.x", "name": "f.dat"})]
    # the dataset was created with both rules, which cover its files
    assert client.rules == [("ds", "SCRATCH"), ("ds", "TAPE")]
    assert "add_replication_rule" not in client.calls


def test_the_pages_of_a_spool_file_are_released_once_sent(
    client: Client, storage: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, start, length, advice: released.append(
        (start, start + length, advice)))
    data = os.urandom((5 << 20) // 2)
    assert upload(uploader(client), job(tmp_path, data)) is True
    assert storage.files == {"/SCRATCH/user.x/f.dat": data}
    mib = 1 << 20
    assert released == [(0, mib, os.POSIX_FADV_DONTNEED), (mib, 2 * mib, os.POSIX_FADV_DONTNEED),
                        (2 * mib, len(data), os.POSIX_FADV_DONTNEED)]


def test_a_rerun_after_registration_transfers_nothing_and_duplicates_nothing(
    client: Client, storage: Store, tmp_path: Path
) -> None:
    work = job(tmp_path, b"payload")
    up = uploader(client)
    upload(up, work)
    storage.files.clear()
    assert upload(up, work) is False
    assert storage.files == {} and len(client.replicas) == 1 and len(client.attached) == 1 and len(client.rules) == 1


def test_other_content_under_the_name_is_a_conflict_and_nothing_is_written(
    client: Client, storage: Store, tmp_path: Path
) -> None:
    client.dids[("user.x", "f.dat")] = {"did_type": "FILE", "bytes": 3, "adler32": "01234567"}
    with pytest.raises(UploadConflictError, match="other content"):
        upload(uploader(client), job(tmp_path, b"payload"))
    assert storage.files == {} and client.replicas == []


def test_a_lost_add_replicas_answer_is_recognised_by_content(client: Client, tmp_path: Path) -> None:
    client.lose_add_replicas_answer = True
    up, work = uploader(client), job(tmp_path, b"payload")
    with pytest.raises(CatalogueUnavailableError):
        upload(up, work)
    assert upload(up, work) is False  # the retry finds the DID registered with our content
    assert len(client.replicas) == 1 and len(client.attached) == 1


def test_a_replica_registered_meanwhile_with_our_content_is_accepted(client: Client, tmp_path: Path) -> None:
    up, work = uploader(client), job(tmp_path, b"payload")
    (url,) = up.locate([work])
    assert isinstance(url, str)
    up.store(work, url)
    client.dids[("user.x", "f.dat")] = {"did_type": "FILE", "bytes": work.size, "adler32": work.adler32}
    assert up.register([Registration(work, stored=True)]) == [None]
    assert len(client.attached) == 1


@pytest.mark.parametrize("fault", ["put-500", "short-on-storage", "bad-digest"])
def test_storage_failures_register_nothing(client: Client, storage: Store, tmp_path: Path, fault: str) -> None:
    if fault == "put-500":
        storage.put_status = 500
    elif fault == "short-on-storage":
        storage.head_size_delta = -1
    else:
        storage.digest = "00000000"
    with pytest.raises(TransferError):
        upload(uploader(client), job(tmp_path, b"payload"))
    assert client.replicas == [] and "add_replicas" not in client.calls


def test_a_leftover_of_an_interrupted_attempt_is_deleted_then_stored(
    client: Client, storage: Store, tmp_path: Path
) -> None:
    work = job(tmp_path, b"payload")
    (url,) = uploader(client).locate([work])
    assert isinstance(url, str)
    path = url.removeprefix(client.base)
    storage.files[path] = b"pay"  # a kill in the middle of the PUT; nothing was registered
    assert upload(uploader(client), work)
    assert storage.deleted == [path] and storage.files[path] == b"payload"


@pytest.mark.parametrize("server", ["honours If-None-Match", "ignores If-None-Match"])
def test_bytes_someone_else_registered_meanwhile_are_never_overwritten(
    client: Client, storage: Store, tmp_path: Path, server: str
) -> None:
    """Between locate and store another client stores and registers other bytes under the name."""
    storage.ignore_if_none_match = server.startswith("ignores")
    work = job(tmp_path, b"payload")
    up = uploader(client)
    (url,) = up.locate([work])
    assert isinstance(url, str)
    path = url.removeprefix(client.base)
    storage.files[path] = b"theirs!"
    client.dids[("user.x", "f.dat")] = {"did_type": "FILE", "bytes": 7, "adler32": "0badc0de"}
    with pytest.raises(UploadConflictError, match="other content"):
        up.store(work, url)
    assert storage.files[path] == b"theirs!" and storage.deleted == []


def test_a_put_refused_as_a_conflict_fails_the_file_with_its_reason(
    client: Client, storage: Store, tmp_path: Path
) -> None:
    """The object appears between our HEAD and our conditional PUT: the server's 412 is a conflict."""
    work = job(tmp_path, b"payload")
    up = uploader(client)
    (url,) = up.locate([work])
    assert isinstance(url, str)
    path = url.removeprefix(client.base)
    storage_client_put = up._storage.put  # type: ignore[attr-defined]

    def racing_put(*args: Any) -> None:
        storage.files[path] = b"theirs!"
        storage_client_put(*args)

    up._storage.put = racing_put  # type: ignore[attr-defined]
    with pytest.raises(UploadConflictError, match="did not write"):
        up.store(work, url)
    assert storage.files[path] == b"theirs!"


def test_a_spool_file_that_changed_since_its_commit_is_detected(client: Client, tmp_path: Path) -> None:
    work = job(tmp_path, b"payload")
    work.path.write_bytes(b"PAYLOAD")
    with pytest.raises(SpoolChangedError):
        upload(uploader(client), work)
    assert client.replicas == []


def test_a_batch_costs_one_call_per_step(client: Client, storage: Store, tmp_path: Path) -> None:
    up = uploader(client)
    jobs = [job(tmp_path, f"payload {n}".encode(), f"f{n}.dat") for n in range(30)]
    up.locate(jobs[:1])  # finds the RSE's write scheme (http here, after https and davs)
    client.calls.clear()
    urls = up.locate(jobs)
    for work, url in zip(jobs, urls, strict=True):
        assert isinstance(url, str)
        up.store(work, url)
    assert up.register([Registration(work, stored=True) for work in jobs]) == [None] * 30
    assert client.calls.count("get_metadata_bulk") == 1 and client.calls.count("lfns2pfns") == 1
    assert client.calls.count("add_replicas") == 1 and client.calls.count("attach_dids_to_dids") == 1
    assert client.calls.count("add_dataset") == 1 and "add_replication_rule" not in client.calls
    assert len(storage.files) == len(client.replicas) == len(client.attached) == 30
    assert client.rules == [("ds", "SCRATCH")]


def test_a_batch_answers_each_file_in_its_place(client: Client, storage: Store, tmp_path: Path) -> None:
    up = uploader(client)
    clash, fresh, done = (job(tmp_path, b"ours", "clash.dat"), job(tmp_path, b"new", "fresh.dat"),
                          job(tmp_path, b"done", "done.dat"))
    client.dids[("user.x", "clash.dat")] = {"did_type": "FILE", "bytes": 5, "adler32": "01234567"}
    client.dids[("user.x", "done.dat")] = {"did_type": "FILE", "bytes": done.size, "adler32": done.adler32}
    client.rules.append(("done.dat", "SCRATCH"))  # an earlier run got this far
    conflict, url, registered = up.locate([clash, fresh, done])
    assert isinstance(conflict, UploadConflictError) and isinstance(url, str) and registered is None
    up.store(fresh, url)
    assert up.register([Registration(fresh, True), Registration(done, False)]) == [None, None]
    assert sorted(client.rules) == [("done.dat", "SCRATCH"), ("ds", "SCRATCH")]
    assert len(client.attached) == 2


@pytest.mark.parametrize("existing_rule", [None, "SCRATCH", "SCRATCH with a lifetime", "TAPE"])
def test_files_of_a_dataset_without_our_rule_get_rules_of_their_own(
    client: Client, storage: Store, tmp_path: Path, existing_rule: str | None
) -> None:
    """A dataset made elsewhere: its own rule on the upload RSE covers the files; otherwise (none,
    one that ends, one elsewhere) each file gets a rule, in one call per batch."""
    client.dids[("user.x", "ds")] = {"did_type": "DATASET"}
    if existing_rule is not None:
        rse = existing_rule.split()[0]
        client.rules.append(("ds", rse))
        if "lifetime" in existing_rule:
            client.rule_expiry[("ds", rse)] = "2027-01-01T00:00:00"
    up = uploader(client)
    jobs = [job(tmp_path, f"payload {n}".encode(), f"f{n}.dat") for n in range(3)]
    for work, url in zip(jobs, up.locate(jobs), strict=True):
        assert isinstance(url, str)
        up.store(work, url)
    assert up.register([Registration(work, True) for work in jobs]) == [None] * 3
    file_rules = sorted(rule for rule in client.rules if rule[0] != "ds")
    if existing_rule == "SCRATCH":
        assert file_rules == [] and "add_replication_rule" not in client.calls
    else:
        assert file_rules == [(f"f{n}.dat", "SCRATCH") for n in range(3)]
        assert client.calls.count("add_replication_rule") == 1
    assert client.calls.count("list_did_rules") == 1


def test_a_batch_refused_as_a_whole_is_asked_again_file_by_file(client: Client, tmp_path: Path) -> None:
    up = uploader(client)
    jobs = [job(tmp_path, f"payload {n}".encode(), f"f{n}.dat") for n in range(3)]
    for work, url in zip(jobs, up.locate(jobs), strict=True):
        assert isinstance(url, str)
        up.store(work, url)
    taken = jobs[1]  # someone registered the same content meanwhile: the batch is rolled back
    client.dids[("user.x", taken.name)] = {"did_type": "FILE", "bytes": taken.size, "adler32": taken.adler32}
    assert up.register([Registration(work, True) for work in jobs]) == [None] * 3
    assert client.calls.count("add_replicas") == 4
    assert sorted(f["name"] for _, f in client.replicas) == ["f0.dat", "f2.dat"]


def test_an_unreachable_server_fails_the_batch_without_asking_file_by_file(client: Client, tmp_path: Path) -> None:
    up = uploader(client)
    jobs = [job(tmp_path, f"payload {n}".encode(), f"f{n}.dat") for n in range(5)]
    client.down = True
    errors = up.register([Registration(work, True) for work in jobs])
    assert all(isinstance(error, CatalogueUnavailableError) for error in errors)
    assert client.calls.count("add_replicas") == 1


def test_did_names_follow_rucios_schema() -> None:
    for good in ("a", "file.root", "A-1_b.c", "x" * 250):
        check_did_name(good)
    for bad in ("", ".hidden", "-x", "a b", "é", "x" * 251):
        with pytest.raises(InvalidNameError):
            check_did_name(bad)


def test_without_an_upload_rse_nothing_happens(client: Client, tmp_path: Path) -> None:
    config = Config()
    with pytest.raises(TransferError, match="upload_rse"):
        upload(RucioUploader(RucioCatalogue(config, client_factory=lambda: client), config, storage_client()),
               job(tmp_path, b"x"))
