"""The Rucio adapter without a Rucio: conversions, ordering, error translation, outages.

Most tests inject a stub in place of rucio's ``Client`` and check what the adapter asks and what it
makes of the answers. The outage tests use the real ``Client`` against loopback sockets that refuse,
hang or answer 503, to show that an outage is reported in seconds and names the server.
"""

from __future__ import annotations

import datetime
import gc
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from rucio.common import exception as rucio_exc

from datalakefs.cache.layout import FileKey
from datalakefs.catalogue.rucio import DIDS_PER_REQUEST, RucioCatalogue
from datalakefs.config import Config
from datalakefs.demo.probes import free_port
from datalakefs.errors import (
    AccessDeniedError,
    CatalogueUnavailableError,
    ConfigError,
    InvalidNameError,
    NotFoundError,
)
from datalakefs.model import DID, DIDInfo, DIDType, Replica, RuleState

WHEN = datetime.datetime(2026, 1, 2, 3, 4, 5)  # rucio hands out naive UTC datetimes
WHEN_POSIX = WHEN.replace(tzinfo=datetime.UTC).timestamp()
TOKEN = "root-ddmlab-secret-token-0123456789"


class StubSession:
    closed = False

    def close(self) -> None:
        self.closed = True


class StubClient:
    """Records every call; answers from ``answers`` or raises ``error``."""

    host = "http://rucio.test:80"
    auth_token = TOKEN

    def __init__(self, answers: dict[str, Any], error: BaseException | None = None) -> None:
        self.answers = answers
        self.error = error
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.session = StubSession()

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((method, args, kwargs))
            if self.error is not None:
                raise self.error
            answer = self.answers[method]
            return answer(*args) if callable(answer) else iter(answer)

        return call


def adapter(stub: StubClient, **options: Any) -> RucioCatalogue:
    return RucioCatalogue(Config(**options), client_factory=lambda: stub)


def streamed(rows: list[dict[str, Any]], cut: int = 7) -> Iterator[bytes]:
    """The body of a streamed listing of ``rows``, arriving in pieces of ``cut`` bytes (a generator,
    as rucio's: the adapter closes it)."""
    body = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    yield from [body[i : i + cut] for i in range(0, len(body), cut)]


def whole(batches: Iterator[list[DIDInfo]]) -> list[DIDInfo]:
    """Every row of a listing's batches, in order."""
    return [info for batch in batches for info in batch]


def test_listing_rows_become_infos() -> None:
    stub = StubClient(
        {
            "listing_body": lambda did, what: streamed([
                {"scope": "d", "name": "f", "type": "FILE", "bytes": 5, "adler32": "0000000a", "md5": None},
                {"scope": "m", "name": "ds", "type": "DATASET", "bytes": None, "adler32": None, "md5": None},
            ]),
            "list_dids": [
                {"scope": "d", "name": "c", "did_type": "DIDType.CONTAINER", "bytes": 0, "length": 2}
            ],
        }
    )
    catalogue = adapter(stub)
    files = whole(catalogue.list_content(DID("d", "run")))
    assert [(i.did, i.type, i.size, i.adler32, i.md5) for i in files] == [
        (DID("d", "f"), DIDType.FILE, 5, "0000000a", None),
        (DID("m", "ds"), DIDType.DATASET, None, None, None),
    ]
    [container] = catalogue.list_collections("d")
    assert (container.did, container.type) == (DID("d", "c"), DIDType.CONTAINER)
    assert stub.calls[0] == ("listing_body", (DID("d", "run"), "dids"), {})
    assert stub.calls[1] == ("list_dids", ("d", [{"name": "*"}]), {"did_type": "collection", "long": True})


def test_files_of_a_dataset_are_files_without_type_or_times() -> None:
    rows = [{"scope": "d", "name": f"f{i}", "bytes": i, "adler32": "0000000a", "md5": "", "events": None}
            for i in range(3)]
    stub = StubClient({"listing_body": lambda did, what: streamed(rows)})
    files = whole(adapter(stub).list_files(DID("d", "ds")))
    assert [(i.did, i.type, i.size, i.adler32, i.md5, i.created_at) for i in files] == [
        (DID("d", f"f{i}"), DIDType.FILE, i, "0000000a", None, 0.0) for i in range(3)
    ]
    assert stub.calls == [("listing_body", (DID("d", "ds"), "files"), {})]


def test_files_without_adler32_get_their_md5_so_their_cache_key_is_the_one_of_get_info() -> None:
    """Rucio's ``list_files`` gives no md5: a file with md5 only would be listed with no checksum at all
    and cached under another key than the same file looked up alone."""
    rows = [{"scope": "d", "name": f"f{i}", "bytes": i, "adler32": None if i % 2 else "0000000a"}
            for i in range(2 * DIDS_PER_REQUEST + 2)]

    def bulk(chunk: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
        return iter([{**metadata_row(d["scope"], d["name"]), "adler32": None, "md5": "m" + d["name"]}
                     for d in chunk if d["name"] != "f1"])  # f1 has neither checksum

    stub = StubClient({"listing_body": lambda did, what: streamed(rows, cut=1 << 20), "get_metadata_bulk": bulk})
    files = whole(adapter(stub).list_files(DID("d", "ds")))
    expected = [(f"f{i}", None, None if i == 1 else f"mf{i}") if i % 2 else (f"f{i}", "0000000a", None)
                for i in range(len(rows))]
    assert [(i.did.name, i.adler32, i.md5) for i in files] == expected
    asked = [[d["name"] for d in args[0]] for name, args, _ in stub.calls if name == "get_metadata_bulk"]
    assert asked == [[f"f{i}" for i in range(1, len(rows), 2)][:DIDS_PER_REQUEST], ["f2001"]]
    assert FileKey.of(files[3]) == FileKey.of(DIDInfo(DID("d", "f3"), DIDType.FILE, 3, None, "mf3"))


#: a good row of ``list_files`` (with its adler32: a batch of files without one asks for their md5)
_FILE_ROW = b'{"scope": "d", "name": "f0", "bytes": 1, "adler32": "0000000a"}\n'


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([_FILE_ROW + b'{"scope": "d", "na'], r"row 2 .*ends inside it"),
        ([_FILE_ROW, b"<html>bad gateway</html>\n"], r"row 2 is not valid JSON"),
        ([_FILE_ROW + b'["d", "f1"]\n'], r"row 2 is not a JSON object"),
        ([b'{"scope": "d", "bytes": 1}\n'], r"not a file \(KeyError\('name'\)\)"),
        ([b'{"scope": "d", "name": "f0", "bytes": "many"}\n'], r"not a file \(ValueError"),
    ],
)
def test_a_malformed_file_row_fails_the_listing_naming_the_server(body: list[bytes], problem: str) -> None:
    stub = StubClient({"listing_body": lambda did, what: (chunk for chunk in body)})
    with pytest.raises(CatalogueUnavailableError, match=problem) as caught:
        whole(adapter(stub).list_files(DID("d", "ds")))
    assert "rucio server http://rucio.test:80" in str(caught.value) and "the files of d:ds" in str(caught.value)


def test_an_empty_listing_tells_an_unknown_scope_from_an_empty_one() -> None:
    stub = StubClient({"list_dids": [], "list_scopes": lambda: ["empty"]})
    assert adapter(stub).list_collections("empty") == []
    assert adapter(stub).query("empty", "*") == []
    with pytest.raises(NotFoundError, match="nope"):
        adapter(stub).list_collections("nope")
    with pytest.raises(NotFoundError, match="nope"):
        adapter(stub).query("nope", "x=1")


def test_scopes_sorted() -> None:
    assert adapter(StubClient({"list_scopes": lambda: ["b", "a"]})).list_scopes() == ["a", "b"]


def metadata_row(scope: str, name: str) -> dict[str, Any]:
    return {
        "scope": scope,
        "name": name,
        "did_type": "FILE",
        "bytes": 7,
        "adler32": "01020304",
        "md5": "abc",
        "created_at": WHEN,
        "updated_at": WHEN + datetime.timedelta(seconds=10),
        "guid": None,
    }


def test_get_info_has_times() -> None:
    stub = StubClient({"get_metadata": lambda scope, name: metadata_row(scope, name)})
    info = adapter(stub).get_info(DID("d", "f"))
    assert (info.created_at, info.updated_at) == (WHEN_POSIX, WHEN_POSIX + 10)
    assert (info.type, info.size, info.adler32, info.md5) == (DIDType.FILE, 7, "01020304", "abc")


def test_get_infos_in_chunks_keeps_order_and_leaves_unknown_out() -> None:
    def bulk(chunk: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
        assert len(chunk) <= DIDS_PER_REQUEST
        return iter([metadata_row(d["scope"], d["name"]) for d in reversed(chunk) if d["name"] != "ghost"])

    stub = StubClient({"get_metadata_bulk": bulk})
    dids = [DID("d", f"f{i}") for i in range(2 * DIDS_PER_REQUEST + 5)]
    infos = adapter(stub).get_infos([*dids, DID("d", "ghost"), dids[0]])
    assert [i.did for i in infos] == dids
    assert len(stub.calls) == 3


def test_generic_metadata_is_text() -> None:
    stub = StubClient(
        {
            "get_metadata": lambda scope, name: {
                "run_number": 350001,
                "created_at": WHEN,
                "guid": None,
                "ok": True,
            }
        }
    )
    meta = adapter(stub).get_metadata(DID("d", "f"))
    assert meta == {"run_number": "350001", "created_at": "2026-01-02T03:04:05+00:00", "ok": "true"}
    assert stub.calls[0][2] == {"plugin": "ALL"}


def replica_row() -> dict[str, Any]:
    return {
        "scope": "d",
        "name": "f",
        "bytes": 9,
        "adler32": "0a0b0c0d",
        "md5": None,
        "pfns": {
            "http://a/f": {"rse": "SITE-A", "priority": 1, "domain": "wan"},
            "root://b//f": {"rse": "SITE-B", "priority": 3, "domain": "wan"},
            "http://b/f": {"rse": "SITE-B", "priority": 2, "domain": "wan"},
            "http://c/f": {"rse": "SITE-C", "priority": 4, "domain": "wan"},
        },
        "rses": {},
    }


def test_replicas_follow_preference_then_server_order() -> None:
    stub = StubClient({"list_replicas": [replica_row()]})
    catalogue = adapter(
        stub, rse_preference=("SITE-C", "SITE-B"), read_schemes=("root", "http"), client_site="DESK"
    )
    [file] = catalogue.list_replicas([DID("d", "f")])
    assert (file.info.did, file.info.size, file.info.adler32) == (DID("d", "f"), 9, "0a0b0c0d")
    assert file.replicas == (
        Replica("SITE-C", "http://c/f"),
        Replica("SITE-B", "http://b/f"),
        Replica("SITE-B", "root://b//f"),
        Replica("SITE-A", "http://a/f"),
    )
    _, args, kwargs = stub.calls[0]
    assert args == ([{"scope": "d", "name": "f"}],)
    assert kwargs["schemes"] == ["root", "http"]
    assert kwargs["client_location"] == {"site": "DESK"}
    assert kwargs["ignore_availability"] is False


def test_replicas_without_preference_or_site() -> None:
    stub = StubClient({"list_replicas": [replica_row()]})
    [file] = adapter(stub).list_replicas([DID("d", "f")])
    assert [r.pfn for r in file.replicas] == ["http://a/f", "http://b/f", "root://b//f", "http://c/f"]
    assert stub.calls[0][2]["client_location"] is None
    assert adapter(stub).list_replicas([]) == []


def test_replicas_in_chunks_the_server_accepts() -> None:
    def replicas(chunk: list[dict[str, str]], **options: Any) -> Iterator[dict[str, Any]]:
        assert len(chunk) <= DIDS_PER_REQUEST
        return iter([{**replica_row(), "name": d["name"]} for d in chunk])

    stub = StubClient({"list_replicas": replicas})
    dids = [DID("d", f"f{i}") for i in range(DIDS_PER_REQUEST + 1)]
    assert [a.info.did for a in adapter(stub).list_replicas(dids)] == dids
    assert len(stub.calls) == 2


@pytest.mark.parametrize(
    ("text", "filters"),
    [
        ("*AOD*", [{"name": "*AOD*"}]),
        ("run_number>=350000,datatype=RAW", [{"run_number.gte": "350000", "datatype": "RAW", "name": "*"}]),
        ("type=dataset;length>3", [{"type": "dataset", "name": "*"}, {"length.gt": "3", "name": "*"}]),
    ],
)
def test_query_filters(text: str, filters: list[dict[str, str]]) -> None:
    stub = StubClient({"list_dids": [{"scope": "d", "name": "x", "did_type": "DATASET", "bytes": None}]})
    [info] = adapter(stub).query("d", text)
    assert info.did == DID("d", "x")
    assert stub.calls[0] == ("list_dids", ("d", filters), {"did_type": "all", "long": True})


@pytest.mark.parametrize("text", ["", "  ", "a=1,a=2", "1<x<2<3"])
def test_bad_query_filters(text: str) -> None:
    stub = StubClient({})
    with pytest.raises(InvalidNameError):
        adapter(stub).query("d", text)
    assert stub.calls == []


@pytest.mark.parametrize(
    ("error", "expected", "words"),
    [
        (rucio_exc.DataIdentifierNotFound("Data identifier 'd:x' not found"), NotFoundError, "d:x"),
        (rucio_exc.ScopeNotFound("no scope"), NotFoundError, "no scope"),
        (rucio_exc.CannotAuthenticate(f"bad token {TOKEN}"), AccessDeniedError, "refused our credentials"),
        (rucio_exc.AccessDenied("not allowed"), AccessDeniedError, "not allowed"),
        (rucio_exc.InvalidObject("bad name"), InvalidNameError, "bad name"),
        (
            rucio_exc.RucioException("no error information passed (http status code: 503)"),
            CatalogueUnavailableError,
            "503",
        ),
        (rucio_exc.DatabaseException("db gone"), CatalogueUnavailableError, "db gone"),
        (requests.ConnectionError("Connection refused"), CatalogueUnavailableError, "cannot be reached"),
        (
            requests.exceptions.SSLError("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"),
            AccessDeniedError,
            "a certificate was not accepted: [SSL: TLSV1_ALERT_UNKNOWN_CA]",
        ),
        (requests.ReadTimeout("read timed out"), CatalogueUnavailableError, "did not answer in time"),
        (
            requests.exceptions.ChunkedEncodingError("broken stream"),
            CatalogueUnavailableError,
            "broken stream",
        ),
        (rucio_exc.MissingClientParameter("rucio_host"), ConfigError, "rucio_host"),
    ],
)
def test_errors_are_translated_naming_the_server_never_the_token(
    error: BaseException, expected: type[Exception], words: str
) -> None:
    catalogue = adapter(StubClient({}, error=error))
    with pytest.raises(expected) as caught:
        catalogue.get_info(DID("d", "x"))
    text = str(caught.value)
    assert words in text
    assert TOKEN not in text
    if expected is not ConfigError:
        assert "rucio.test" in text
    assert caught.value.__cause__ is error


def test_errors_while_streaming_are_translated() -> None:
    def broken(*args: Any) -> Iterator[bytes]:
        yield b'{"scope": "d", "name": "f", "type": "FILE", "bytes": 1}\n'
        raise requests.exceptions.ChunkedEncodingError("connection reset mid-stream")

    with pytest.raises(CatalogueUnavailableError, match="mid-stream"):
        whole(adapter(StubClient({"listing_body": broken})).list_content(DID("d", "ds")))


def test_clients_are_pooled_one_per_concurrent_call_and_closed() -> None:
    barrier = threading.Barrier(2)
    together = threading.Event()
    built: list[StubClient] = []

    def scopes() -> list[str]:
        if together.is_set():
            barrier.wait(5)  # returns only when both calls are inside a client at once
        return ["a"]

    def factory() -> StubClient:
        built.append(StubClient({"list_scopes": scopes}))
        return built[-1]

    catalogue = RucioCatalogue(Config(), client_factory=factory)
    for _ in range(3):
        catalogue.list_scopes()
    assert len(built) == 1  # sequential calls reuse one client
    together.set()
    threads = [threading.Thread(target=catalogue.list_scopes) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert not barrier.broken
    assert len(built) == 2  # the second concurrent call got a client of its own
    catalogue.close()
    assert all(client.session.closed for client in built)
    with pytest.raises(CatalogueUnavailableError, match="closed"):
        catalogue.list_scopes()


# -- the real rucio Client against loopback sockets ------------------------------------------------


def rucio_cfg(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "rucio.cfg"
    path.write_text(
        "[client]\n"
        f"rucio_host = http://127.0.0.1:{port}\n"
        f"auth_host = http://127.0.0.1:{port}\n"
        "auth_type = userpass\nusername = u\npassword = p\naccount = root\n"
        f"auth_token_file_path = {tmp_path}/token\n"
    )
    return path


@pytest.fixture
def refusing_port() -> int:
    return free_port()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts connections (the kernel does) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


class _Failing503(http.server.BaseHTTPRequestHandler):
    """Gives a token, then answers 503 to everything else, like an overloaded server."""

    def do_GET(self) -> None:
        if self.path.startswith("/auth/userpass"):
            self.send_response(200)
            self.send_header("X-Rucio-Auth-Token", TOKEN)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.refused += 1  # type: ignore[attr-defined]
        body = b"Service Unavailable"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server_503() -> Iterator[http.server.ThreadingHTTPServer]:
    """A server answering 503; its ``refused`` counts the requests it refused."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing503)
    server.refused = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


TIMEOUT = 1.0


def scopes_failure(tmp_path: Path, port: int) -> tuple[CatalogueUnavailableError, float]:
    catalogue = RucioCatalogue(Config(rucio_config=str(rucio_cfg(tmp_path, port)), catalogue_timeout=TIMEOUT))
    started = time.monotonic()
    try:
        with pytest.raises(CatalogueUnavailableError) as caught:
            catalogue.list_scopes()
    finally:
        catalogue.close()
    return caught.value, time.monotonic() - started


def test_refused_connection_is_reported_as_unreachable(tmp_path: Path, refusing_port: int) -> None:
    error, _ = scopes_failure(tmp_path, refusing_port)
    assert f"127.0.0.1:{refusing_port}" in str(error)
    assert "cannot be reached" in str(error)


def test_silent_server_times_out(tmp_path: Path, silent_port: int) -> None:
    error, elapsed = scopes_failure(tmp_path, silent_port)
    assert "did not answer in time" in str(error)
    assert f"127.0.0.1:{silent_port}" in str(error)
    assert elapsed < 20 * TIMEOUT  # the configured timeout fired (with ample slack), not the socket's default


def test_server_errors_are_retried_a_few_times(tmp_path: Path, server_503: http.server.ThreadingHTTPServer) -> None:
    error, _ = scopes_failure(tmp_path, int(server_503.server_address[1]))
    assert "503" in str(error)
    assert TOKEN not in str(error)
    assert server_503.refused == 3  # type: ignore[attr-defined]  # rucio's own retries, then it gives up


def test_one_rucio_config_per_process(
    tmp_path: Path, refusing_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUCIO_CONFIG", "/before")
    first = RucioCatalogue(Config(rucio_config=str(rucio_cfg(tmp_path, refusing_port))))
    same = RucioCatalogue(Config(rucio_config=str(tmp_path / "rucio.cfg")))
    with pytest.raises(ConfigError, match="one configuration per process"):
        RucioCatalogue(Config(rucio_config=str(tmp_path / "other.cfg")))
    first.close()
    first.close()  # idempotent
    same.close()
    other = RucioCatalogue(Config(rucio_config=str(tmp_path / "other.cfg")))
    other.close()
    assert os.environ["RUCIO_CONFIG"] == "/before"


def _rule_row(state: str, **extra: Any) -> dict[str, Any]:
    return {"id": "r1", "scope": "data", "name": "run1", "rse_expression": "SCRATCH", "state": state,
            "account": "alice", "locks_ok_cnt": 2, "locks_replicating_cnt": 1, "locks_stuck_cnt": 0,
            "error": None, **extra}


def test_rules_keep_their_states_apart() -> None:
    rows = [_rule_row(s) for s in ("OK", "R", "STUCK", "U", "WAITING_APPROVAL", "I")]
    rows.append(_rule_row("RuleState.SUSPENDED", error="  many\n  spaces "))
    stub = StubClient({"list_associated_rules_for_file": rows})
    rules = adapter(stub).file_rules(DID("data", "f1"))
    assert [r.state for r in rules] == [RuleState.OK, RuleState.REPLICATING, RuleState.STUCK, RuleState.SUSPENDED,
                                        RuleState.WAITING_APPROVAL, RuleState.INJECT, RuleState.SUSPENDED]
    assert (rules[0].locks_ok, rules[0].locks_total, rules[-1].error) == (2, 3, "many spaces")


def test_a_duplicate_rule_is_the_existing_one() -> None:
    def refuse(*args: Any) -> Any:
        raise rucio_exc.DuplicateRule()

    stub = StubClient({"add_replication_rule": refuse,
                       "list_did_rules": [_rule_row("OK", rse_expression="OTHER"), _rule_row("R")]})
    stub.account = "alice"
    rule, created = adapter(stub).add_rule(DID("data", "run1"), "SCRATCH", 3600, None, None, asynchronous=True)
    assert (rule.id, created) == ("r1", False)
    assert stub.calls[0][2]["asynchronous"] is True


def test_replica_on_an_rse_in_any_state() -> None:
    rows = [{"scope": "data", "name": "f1", "states": {"SCRATCH": "COPYING", "ORIGIN": "AVAILABLE"},
             "pfns": {"https://s/f1": {"rse": "SCRATCH"}, "https://o/f1": {"rse": "ORIGIN"}}}]
    replica = adapter(StubClient({"list_replicas": rows})).replica_on(DID("data", "f1"), "SCRATCH")
    assert replica is not None and (replica.available, replica.pfns) == (False, ("https://s/f1",))
    assert adapter(StubClient({"list_replicas": []})).replica_on(DID("data", "f1"), "SCRATCH") is None


def test_a_listings_infos_are_made_with_the_collector_paused() -> None:
    """datalakefs/gcpause.py: the collector walking half a million new objects found no garbage."""
    collecting: list[bool] = []

    def body(did: DID, what: str) -> Iterator[bytes]:
        rows = [{"scope": "d", "name": f"f{i}", "type": "FILE", "bytes": i, "adler32": "0000000a"} for i in range(3)]
        for chunk in streamed(rows):
            collecting.append(gc.isenabled())
            yield chunk

    enabled = gc.isenabled()
    gc.enable()
    try:
        assert len(whole(adapter(StubClient({"listing_body": body})).list_files(DID("d", "ds")))) == 3
        assert len(whole(adapter(StubClient({"listing_body": body})).list_content(DID("d", "ds")))) == 3
        assert collecting and not any(collecting) and gc.isenabled()
    finally:
        if not enabled:
            gc.disable()
