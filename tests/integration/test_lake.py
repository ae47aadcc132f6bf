"""The local data lake is real: catalogue, storage, XCache, transfers, knobs, and a clean `down`.

Every DID comes from the seed's roles, every port and path from the lake's status. Tests that
create data use fresh, unique names (the lake is kept between sessions). The `down` test stops
the session lake itself and is therefore moved to the end of the session (``lake_down``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from datalakefs import config as dlconfig
from datalakefs.demo import seed
from datalakefs.demo.lake import Lake
from datalakefs.demo.layout import DEFAULT_PORT_BASE, PORT_OFFSETS
from datalakefs.demo.probes import port_in_use
from datalakefs.demo.processes import is_alive, is_mounted, read_record
from datalakefs.demo.status import LakeStatus, Seed

Demo = Callable[..., subprocess.CompletedProcess[str]]


def unique(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000)}_{os.getpid()}"


def split(did: str) -> tuple[str, str]:
    scope, name = did.split(":", 1)
    return scope, name


def adler32_of(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def file_adler32(path: Path) -> str:
    value = 1
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            value = zlib.adler32(chunk, value)
    return f"{value & 0xFFFFFFFF:08x}"


def range_get(url: str, first: int, last: int) -> tuple[int, bytes]:
    """A closed in-bounds Range GET (XrdHttp 5.5.3 mishandles every other kind)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={first}-{last}"})
    with urllib.request.urlopen(request, timeout=120, context=ssl._create_unverified_context()) as resp:
        return resp.status, resp.read()


def wait_rule(client: Any, rule_id: str, done: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rule: dict[str, Any] = client.get_replication_rule(rule_id)
        if done(rule):
            return rule
        if time.monotonic() > deadline:
            pytest.fail(f"rule {rule_id} still {rule['state']} after {timeout} s: {rule}", pytrace=False)
        time.sleep(0.25)


def fresh_origin_dataset(lake: LakeStatus, client: Any, sizes: tuple[int, ...]) -> seed.DatasetPlan:
    """A new dataset that exists only on LAKE-ORIGIN (so a rule really has to move it)."""
    assert lake.seed is not None
    scope = lake.seed.upload_scope
    name = unique("lake_test")
    plan = seed.DatasetPlan(
        scope, name, tuple(seed.FileSpec(scope, f"{name}.f{i}.bin", size) for i, size in enumerate(sizes))
    )
    seed.add_origin_dataset(client, Lake(lake.state_dir), plan)
    return plan


@pytest.fixture
def seeded(lake: LakeStatus) -> Seed:
    assert lake.seed is not None
    return lake.seed


# --------------------------------------------------------------------------------------------------
# without the lake


def test_status_of_a_lake_that_is_not_up(demo_cli: Demo) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as state:
        result = demo_cli("status", "--json", state_dir=Path(state), port_base=None)
    assert result.returncode == 0, result.stderr
    status = LakeStatus.from_json(json.loads(result.stdout))
    assert not status.healthy
    assert status.seed is None
    assert set(status.services) == {
        "postgres",
        "origin",
        "xcache",
        "xcache-fwd",
        "origin-token",
        "guard",
        "dav-auth",
        "dav",
        "dav-tls",
        "fts",
        "rucio",
        "rucio-tls",
        "daemons",
    }
    assert all(not s.healthy and s.pid is None for s in status.services.values())
    assert status.services["rucio"].port == DEFAULT_PORT_BASE + PORT_OFFSETS["rucio"]


def test_a_taken_port_is_named(demo_cli: Demo) -> None:
    base = next(b for b in range(45000, 60000, 100) if not any(port_in_use(b + o) for o in PORT_OFFSETS.values()))
    taken = base + PORT_OFFSETS["dav_https"]
    with socket.socket() as blocker, tempfile.TemporaryDirectory(dir="/var/tmp") as state:
        os.chmod(state, 0o755)
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        result = demo_cli("up", state_dir=Path(state), port_base=base)
        assert result.returncode == 1
        assert f"port {taken}" in result.stderr
        # refused before anything was built or started
        assert not (Path(state) / "venv").exists()
        assert not list(Path(state).glob("run/*.pid"))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the lake to the postgres and xrootd users")
def test_an_untraversable_state_dir_is_refused(demo_cli: Demo) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as parent:
        os.chmod(parent, 0o700)
        result = demo_cli("up", state_dir=Path(parent) / "lake", port_base=45900)
    assert result.returncode == 1
    assert "cannot enter" in result.stderr
    assert parent in result.stderr


# --------------------------------------------------------------------------------------------------
# the catalogue


@pytest.mark.lake
def test_seeded_dids_and_metadata(rucio_client: Any, seeded: Seed) -> None:
    client = rucio_client
    assert set(seeded.scopes) <= set(client.list_scopes())

    children = {f"{c['scope']}:{c['name']}" for c in client.list_content(*split(seeded.container))}
    assert children == set(seeded.container_children)
    assert any(split(c)[0] != split(seeded.container)[0] for c in children), "no cross-scope child"
    nested = list(client.list_content(*split(seeded.nested_container)))
    assert nested
    assert all(c["type"] == "CONTAINER" for c in nested)

    sized = {f"{f['scope']}:{f['name']}": f["bytes"] for f in client.list_files(*split(seeded.sized_dataset))}
    assert sized == {did: size for size, did in seeded.sized_files.items()}
    assert seeded.sized_files[1 << 30] == seeded.big_file

    assert sum(1 for _ in client.list_files(*split(seeded.dataset_10k))) == 10_000

    parents = {f"{p['scope']}:{p['name']}" for p in client.list_parent_dids(*split(seeded.multi_dataset_file))}
    assert set(seeded.multi_dataset_file_datasets) <= parents
    assert len(seeded.multi_dataset_file_datasets) >= 2

    cross = list(client.list_files(*split(seeded.cross_scope_dataset)))
    assert cross
    assert all(f["scope"] != split(seeded.cross_scope_dataset)[0] for f in cross)

    escaped = {f"{f['scope']}:{f['name']}" for f in client.list_files(*split(seeded.escaped_dataset))}
    assert set(seeded.escaped_names) == escaped
    names = [split(d)[1] for d in seeded.escaped_names]
    assert any(n.startswith("/") for n in names)
    assert any("/" in n.lstrip("/") for n in names)
    assert 240 <= len(split(seeded.long_name)[1]) <= 250
    assert "/" in split(seeded.escaped_dataset)[1]
    traversal = [f"{f['scope']}:{f['name']}" for f in client.list_files(*split(seeded.traversal_dataset))]
    assert traversal == [seeded.traversal_name]
    assert "/../" in seeded.traversal_name

    meta = client.get_metadata(*split(seeded.metadata_dataset.did))
    for key, value in seeded.metadata_dataset.metadata.items():
        assert meta[key] == value

    from rucio.common.utils import parse_did_filter_from_string_fe

    query = seeded.metadata_query
    filters, did_type = parse_did_filter_from_string_fe(query.filter, type="all")
    found = {f"{query.scope}:{n}" for n in client.list_dids(query.scope, filters, did_type=did_type)}
    assert found == set(query.expected)


@pytest.mark.lake
def test_seeded_bytes_are_where_rucio_says(lake: LakeStatus, rucio_client: Any, seeded: Seed) -> None:
    dids = [dict(zip(("scope", "name"), split(d), strict=True)) for d in seeded.sized_files.values()]
    dids += [dict(zip(("scope", "name"), split(d), strict=True)) for d in seeded.escaped_names]
    replicas = list(rucio_client.list_replicas(dids, schemes=["http"]))
    assert len(replicas) == len(dids)
    origin_http = lake.urls["origin_http"] + f"/{seeded.origin_rse}/"
    for rep in replicas:
        did = f"{rep['scope']}:{rep['name']}"
        assert rep["states"] == {seeded.origin_rse: "AVAILABLE"}
        [pfn] = rep["pfns"]
        assert pfn == origin_http + seed.hash_path(rep["scope"], rep["name"])
        path = seed.rse_file(lake.paths["origin"], rep["scope"], rep["name"])
        assert path.stat().st_size == rep["bytes"]
        assert file_adler32(path) == rep["adler32"]
        with open(path, "rb") as fh:
            head = fh.read(4096)
            fh.seek(max(rep["bytes"] - 4096, 0))
            tail = fh.read()
        size = rep["bytes"]
        assert head == seed.content(seeded.content_key, did, size, 0, 4096)
        assert tail == seed.content(seeded.content_key, did, size, max(size - 4096, 0))


@pytest.mark.lake
def test_env_config_and_rucio_cli(lake: LakeStatus, demo_cli: Demo, seeded: Seed, tmp_path: Path) -> None:
    exports = demo_cli("env", port_base=None)
    assert exports.returncode == 0, exports.stderr
    script = tmp_path / "whoami.sh"
    rucio_cli = Path(sys.executable).with_name("rucio")
    script.write_text(f"{exports.stdout}\nexec {shlex.quote(str(rucio_cli))} whoami\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUCIO_", "X509_"))}
    whoami = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert whoami.returncode == 0, whoami.stderr
    assert "root" in whoami.stdout

    conf = dlconfig.load(str(lake.datalakefs_config))
    assert conf.rucio_config == str(lake.rucio_config)
    assert conf.xcache == lake.urls["xcache_http"]
    assert conf.staging_rse == conf.upload_rse == seeded.scratch_rse
    assert conf.cache_dir.is_relative_to(lake.state_dir)
    assert conf.state_dir.is_relative_to(lake.state_dir)
    mapping = dict(entry.split("=", 1) for entry in conf.staging_local_paths)
    assert f"{lake.urls['dav_https']}/{seeded.scratch_rse}/" in mapping
    assert all(Path(local).resolve() == lake.paths["scratch"].resolve() for local in mapping.values())


# --------------------------------------------------------------------------------------------------
# storage and transfers


@pytest.mark.lake
def test_upload_to_scratch_registers_the_right_adler32(
    lake: LakeStatus, rucio_client: Any, seeded: Seed, tmp_path: Path
) -> None:
    from rucio.client.uploadclient import UploadClient

    data = os.urandom(300_000 + 7)
    name = unique("upload") + ".bin"
    path = tmp_path / name
    path.write_bytes(data)
    UploadClient(rucio_client).upload(
        [{"path": str(path), "rse": seeded.scratch_rse, "did_scope": seeded.upload_scope, "did_name": name}]
    )
    did = {"scope": seeded.upload_scope, "name": name}
    [rep] = list(rucio_client.list_replicas([did], schemes=["https"]))
    assert rep["states"] == {seeded.scratch_rse: "AVAILABLE"}
    assert rep["adler32"] == adler32_of(data)
    assert rep["bytes"] == len(data)
    # the PFN maps to the local directory the datalakefs config declares for SCRATCH
    [pfn] = rep["pfns"]
    conf = dlconfig.load(str(lake.datalakefs_config))
    prefix, local = next(
        (p, loc) for p, loc in (e.split("=", 1) for e in conf.staging_local_paths) if pfn.startswith(p)
    )
    on_disk = Path(local) / pfn[len(prefix) :]
    assert on_disk.read_bytes() == data
    assert on_disk == seed.rse_file(lake.paths["scratch"], seeded.upload_scope, name)


@pytest.mark.lake
def test_rule_from_origin_to_scratch_moves_the_bytes(lake: LakeStatus, rucio_client: Any, seeded: Seed) -> None:
    plan = fresh_origin_dataset(lake, rucio_client, (0, 1, 100_000, (1 << 20) + 1))
    started = time.monotonic()
    [rule_id] = rucio_client.add_replication_rule([{"scope": plan.scope, "name": plan.name}], 1, seeded.scratch_rse)
    rule = wait_rule(
        rucio_client,
        rule_id,
        lambda r: r["state"] in ("OK", "STUCK") and r["locks_replicating_cnt"] == 0,
        120,
    )
    print(f"\nrule to {seeded.scratch_rse}: {rule['state']} after {time.monotonic() - started:.1f} s")
    assert rule["state"] == "OK", rule.get("error")
    assert rule["locks_ok_cnt"] == len(plan.files)
    for spec in plan.files:
        [rep] = list(rucio_client.list_replicas([{"scope": spec.scope, "name": spec.name}]))
        assert rep["states"] == {seeded.origin_rse: "AVAILABLE", seeded.scratch_rse: "AVAILABLE"}
        origin = seed.rse_file(lake.paths["origin"], spec.scope, spec.name).read_bytes()
        scratch = seed.rse_file(lake.paths["scratch"], spec.scope, spec.name).read_bytes()
        assert scratch == origin == seed.content(seeded.content_key, spec.did, spec.size)


@pytest.mark.lake
def test_range_get_through_xcache_returns_the_origin_bytes(lake: LakeStatus, rucio_client: Any, seeded: Seed) -> None:
    did = seeded.sized_files[64 << 20]
    scope, name = split(did)
    [rep] = list(rucio_client.list_replicas([{"scope": scope, "name": name}], schemes=["http"]))
    [pfn] = rep["pfns"]
    size = rep["bytes"]
    origin = lake.urls["origin_http"]
    assert pfn.startswith(origin + "/")
    path = pfn[len(origin) :]
    fixed = lake.urls["xcache_http"] + path
    forwarding = f"{lake.urls['xcache_fwd_http']}//{lake.urls['origin_root']}//{path.lstrip('/')}"
    ranges = [(0, 99), (size // 2 + 12345, size // 2 + 12345 + 4095), (size - 100, size - 1)]
    with open(seed.rse_file(lake.paths["origin"], scope, name), "rb") as fh:
        for first, last in ranges:
            fh.seek(first)
            expected = fh.read(last - first + 1)
            assert expected == seed.content(seeded.content_key, did, size, first, last - first + 1)
            for url in (pfn, fixed, forwarding):
                status, body = range_get(url, first, last)
                assert (status, len(body)) == (206, last - first + 1), url
                assert body == expected, url
    # the fixed-origin XCache really holds blocks of the file now
    cached = lake.paths["xcache"] / path.lstrip("/")
    assert cached.exists()
    assert cached.stat().st_blocks > 0


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(child) for child in fh.read().split()]


@pytest.mark.lake
def test_a_crashed_xcache_is_started_again(lake: LakeStatus, rucio_client: Any, seeded: Seed) -> None:
    """XCache 5.5.3 segfaults now and then under storms of small reads: its supervisor starts it again,
    and reads through it work again, without a `demo up`."""
    did = seeded.sized_files[64 << 20]
    scope, name = split(did)
    [rep] = list(rucio_client.list_replicas([{"scope": scope, "name": name}], schemes=["http"]))
    [pfn] = rep["pfns"]
    through_xcache = lake.urls["xcache_http"] + pfn[len(lake.urls["origin_http"]) :]
    expected = seed.content(seeded.content_key, did, rep["bytes"], 0, 100)
    layout = Lake(lake.state_dir).layout
    record = read_record(layout.pid_file("xcache"))
    assert record is not None and is_alive(record)
    [server] = _children(record.pid)  # the supervisor's one child: the XRootD server
    os.kill(server, 9)  # any death by a signal is a crash to the supervisor (SIGKILL: no core dump)
    deadline = time.monotonic() + 60
    while True:
        try:
            assert range_get(through_xcache, 0, 99) == (206, expected)
            break
        except (OSError, http.client.HTTPException):  # refused while it starts again
            assert time.monotonic() < deadline, "the XCache did not come back within 60 s"
            time.sleep(0.2)
    assert is_alive(record)  # the same supervisor, which `demo down` stops
    [again] = _children(record.pid)
    assert again != server
    with open(layout.log / "xcache.out", "rb") as log:  # appended to across lake restarts: its end
        log.seek(max(0, log.seek(0, os.SEEK_END) - (1 << 20)))
        assert b"xcache: died of SIGKILL" in log.read()


@pytest.fixture
def cleanup_rules(rucio_client: Any) -> Iterator[list[str]]:
    """Rules a test created; they are expired at teardown so the lake does not keep retrying them."""
    rules: list[str] = []
    yield rules
    for rule_id in rules:
        rucio_client.update_replication_rule(rule_id, {"lifetime": 0})


@pytest.mark.lake
def test_forced_failure_knob_makes_a_rule_stuck_with_a_reason(
    lake: LakeStatus,
    rucio_client: Any,
    seeded: Seed,
    fts_knobs: Callable[..., None],
    cleanup_rules: list[str],
) -> None:
    plan = fresh_origin_dataset(lake, rucio_client, (2048,))
    fts_knobs(fail=plan.name)
    [rule_id] = rucio_client.add_replication_rule([{"scope": plan.scope, "name": plan.name}], 1, seeded.scratch_rse)
    cleanup_rules.append(rule_id)
    rule = wait_rule(rucio_client, rule_id, lambda r: r["state"] == "STUCK", 120)
    assert rule["locks_stuck_cnt"] == 1
    assert "forced failure by fts-shim" in (rule["error"] or "")
    assert not seed.rse_file(lake.paths["scratch"], plan.scope, plan.files[0].name).exists()


@pytest.mark.lake
def test_delay_knob_holds_a_transfer_while_the_lake_runs(
    lake: LakeStatus, rucio_client: Any, seeded: Seed, fts_knobs: Callable[..., None], demo_cli: Demo
) -> None:
    delay = 4.0
    changed = demo_cli("knobs", "--delay", str(delay), port_base=None)
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout) == {"delay": delay, "fail": None}
    with urllib.request.urlopen(lake.urls["fts"] + "/_knobs", timeout=10) as resp:
        assert json.load(resp) == {"delay": delay, "fail": None}
    plan = fresh_origin_dataset(lake, rucio_client, (1000,))
    started = time.monotonic()
    [rule_id] = rucio_client.add_replication_rule([{"scope": plan.scope, "name": plan.name}], 1, seeded.scratch_rse)
    time.sleep(delay / 2)
    assert rucio_client.get_replication_rule(rule_id)["state"] == "REPLICATING"
    rule = wait_rule(rucio_client, rule_id, lambda r: r["state"] in ("OK", "STUCK"), 120)
    assert rule["state"] == "OK", rule.get("error")
    assert time.monotonic() - started >= delay
    cleared = demo_cli("knobs", "--clear", port_base=None)
    assert json.loads(cleared.stdout) == {"delay": 0.0, "fail": None}


@pytest.mark.lake
def test_only_a_verified_certificate_names_the_x509_client(lake: LakeStatus) -> None:
    """Rucio takes the x509 DN from the TLS front's verified certificate, never from a header."""
    assert lake.x509 is not None
    forged = {"X-SSL-Client-S-DN": lake.x509.dn, "SSL-Client-S-DN": lake.x509.dn, "SSL_CLIENT_S_DN": lake.x509.dn}
    context = ssl.create_default_context(cafile=str(lake.x509.ca_cert))
    for url, tls in ((f"{lake.urls['rucio']}/auth/x509", None), (f"{lake.x509.auth_host}/auth/x509", context)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, headers=forged), timeout=30, context=tls)
        with refused.value as answer:  # closes its connection
            assert answer.code == 401
            assert answer.headers["ExceptionMessage"] == "Cannot get DN"
    context.load_cert_chain(str(lake.x509.user_cert), str(lake.x509.user_key))
    with urllib.request.urlopen(f"{lake.x509.auth_host}/auth/x509", timeout=30, context=context) as granted:
        assert granted.headers["X-Rucio-Auth-Account"] == "root"


def dav(url: str, method: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None) -> int:
    """The status of one WebDAV request (an error status is an answer too)."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code


@pytest.mark.lake
def test_the_doors_refuse_anonymous_changes_and_take_a_token_or_the_proxy(
    lake: LakeStatus, seeded: Seed, demo_cli: Demo
) -> None:
    assert lake.x509 is not None
    tls = ssl.create_default_context(cafile=str(lake.datalakefs_config.parent / "dav.crt"))
    with_proxy = ssl.create_default_context(cafile=str(lake.datalakefs_config.parent / "dav.crt"))
    with_proxy.load_cert_chain(str(lake.x509.proxy))
    name = unique("door")
    for door, context in (("dav_http", None), ("dav_https", tls)):
        base = f"{lake.urls[door]}/{seeded.scratch_rse}/doors/{name}-{door}"
        for method, extra in (("PUT", {"data": b"anonymous"}), ("MKCOL", {}), ("DELETE", {}),
                              ("MOVE", {"headers": {"Destination": base + ".moved"}})):
            assert dav(base + ".f", method, context=context, **extra) == 401, (door, method)
        assert not list(Path(lake.paths["scratch"]).glob(f"doors/{name}*"))
    minted = demo_cli("token", "--scope", "storage.create:/SCRATCH storage.modify:/SCRATCH")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    reader = demo_cli("token", "--scope", "storage.read:/").stdout.strip()
    url = f"{lake.urls['dav_http']}/{seeded.scratch_rse}/doors/{name}.token"
    assert dav(url, "PUT", data=b"x", headers={"Authorization": f"Bearer {reader}"}) == 403
    assert dav(url, "PUT", data=b"token", headers={"Authorization": f"Bearer {token}"}) == 201
    conditional = {"Authorization": f"Bearer {token}", "If-None-Match": "*"}
    assert dav(url, "PUT", data=b"again", headers=conditional) == 412  # never overwritten
    origin = f"{lake.urls['dav_http']}/{seeded.origin_rse}/doors/{name}.token"
    assert dav(origin, "PUT", data=b"x", headers={"Authorization": f"Bearer {token}"}) == 403  # scope: SCRATCH only
    proxied = f"{lake.urls['dav_https']}/{seeded.scratch_rse}/doors/{name}.proxy"
    assert dav(proxied, "PUT", data=b"proxy", context=with_proxy) == 201
    for stored, body in ((url, b"token"), (proxied, b"proxy")):  # reads stay anonymous
        with urllib.request.urlopen(stored, timeout=30, context=tls) as answer:
            assert answer.read() == body
    assert dav(url, "DELETE", headers={"Authorization": f"Bearer {token}"}) == 204


@pytest.mark.lake
def test_the_https_door_keeps_a_connection_and_checks_every_request_on_it(lake: LakeStatus, seeded: Seed) -> None:
    """As a production storage, the https door answers several requests on one connection; a header
    forging the verified subject is dropped from each of them, whatever their body's framing."""
    assert lake.x509 is not None
    door = urllib.parse.urlsplit(lake.urls["dav_https"])
    stem = unique("keep")
    base = f"/{seeded.scratch_rse}/doors/{stem}"

    def exchange(connection: http.client.HTTPSConnection, method: str, path: str,
                 body: bytes | Iterator[bytes] | None = None, headers: dict[str, str] | None = None) -> int:
        connection.request(method, path, body=body, headers=headers or {}, encode_chunked=isinstance(body, Iterator))
        answer = connection.getresponse()
        answer.read()
        assert not answer.will_close, (method, path)
        return answer.status

    anonymous = ssl.create_default_context(cafile=str(lake.datalakefs_config.parent / "dav.crt"))
    forged = {"X-Client-Verified": lake.x509.dn}
    plain = http.client.HTTPSConnection(door.hostname or "", door.port, context=anonymous, timeout=30)
    with contextlib.closing(plain):
        assert exchange(plain, "HEAD", f"/{seeded.scratch_rse}/") == 200
        assert exchange(plain, "PUT", base + ".length", b"abc", forged) == 401
        assert exchange(plain, "PUT", base + ".chunked", iter([b"ab", b"c"]), forged) == 401
        assert exchange(plain, "HEAD", f"/{seeded.scratch_rse}/") == 200  # the framing kept the requests apart
    with_proxy = ssl.create_default_context(cafile=str(lake.datalakefs_config.parent / "dav.crt"))
    with_proxy.load_cert_chain(str(lake.x509.proxy))
    proxied = http.client.HTTPSConnection(door.hostname or "", door.port, context=with_proxy, timeout=30)
    with contextlib.closing(proxied):
        assert exchange(proxied, "PUT", base + ".one", b"one") == 201
        first = proxied.sock
        assert exchange(proxied, "PUT", base + ".two", iter([b"t", b"wo"])) == 201
        assert exchange(proxied, "HEAD", base + ".two") == 200
        assert proxied.sock is first  # one connection, one handshake
    stored = sorted(path.name for path in Path(lake.paths["scratch"]).glob(f"doors/{stem}*"))
    assert stored == [f"{stem}.one", f"{stem}.two"]


# --------------------------------------------------------------------------------------------------
# lifecycle


@pytest.mark.lake
def test_up_again_keeps_the_running_lake(lake: LakeStatus, demo_cli: Demo) -> None:
    result = demo_cli("up")
    assert result.returncode == 0, result.stderr
    after = Lake(lake.state_dir).status()
    assert after.healthy
    assert {n: s.pid for n, s in after.services.items()} == {n: s.pid for n, s in lake.services.items()}


@pytest.mark.lake
@pytest.mark.lake_down
def test_down_leaves_nothing_running_and_up_comes_back_warm(lake: LakeStatus, demo_cli: Demo, lake_alone: None) -> None:
    control = Lake(lake.state_dir)
    records = {name: read_record(control.layout.pid_file(name)) for name in lake.services}
    assert all(rec is not None and is_alive(rec) for rec in records.values())
    ports = sorted({port for svc in lake.services.values() for port in svc.ports.values()})

    down = demo_cli("down", port_base=None)
    assert down.returncode == 0, down.stderr
    assert [name for name, rec in records.items() if rec is not None and is_alive(rec)] == []
    assert [port for port in ports if port_in_use(port)] == []
    assert not list(control.layout.run.glob("*.pid"))
    if lake.mountpoint is not None:
        assert not is_mounted(lake.mountpoint)
    status = Lake(lake.state_dir).status()
    assert not any(s.healthy or s.pid is not None for s in status.services.values())

    up = demo_cli("up")
    assert up.returncode == 0, up.stderr
    assert Lake(lake.state_dir).status().healthy
    # warm: what the first up built is reused, not built again
    assert "creating the Rucio server venv" not in up.stderr and "PostgreSQL cluster created" not in up.stderr
