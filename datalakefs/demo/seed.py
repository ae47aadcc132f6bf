"""Seed the demo lake: RSE definitions, scopes, collections, files and metadata (rucio-clients).

Runs in the project venv after `up` started the services, with RUCIO_CONFIG and X509_USER_PROXY
of the lake set by the caller. File bytes are written straight into LAKE-ORIGIN's directory at
the path Rucio's ``hash`` lfn2pfn algorithm gives (:func:`hash_path`), then registered in bulk,
1000 at a time (``add_replicas`` makes the file DIDs and their replicas, ``attach_dids_to_dids``
puts them in the dataset); nothing is uploaded through the WebDAV door, so a 1 GiB file costs
one local write.

Invariants:
* file content is a pure function of (content key, DID, offset): :func:`content` recomputes any
  byte range, so tests can check what they read without keeping copies;
* seeding is idempotent and resumable: every call tolerates what already exists, and
  ``seed.json`` records the seed version and the parts done, so a warm `up` only reconciles the
  RSE definitions (whose URLs follow ``--port-base``);
* the seed's roles (:class:`~datalakefs.demo.status.Seed`) are the only names tests rely on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from rucio.client import Client
from rucio.common.exception import (
    DataIdentifierAlreadyExists,
    Duplicate,
    RSEProtocolNotSupported,
)

from datalakefs.demo.lake import Lake
from datalakefs.demo.layout import ORIGIN_RSE, SCRATCH_RSE, SEED_FILE_VERSION
from datalakefs.demo.status import MetadataDataset, MetadataQuery, Seed
from datalakefs.demo.x509 import IDENTITY_EMAIL, USER_DN

SEED_VERSION: Final = 1
CONTENT_KEY: Final = "datalakefs-demo-1"
BLOCK: Final = 1 << 20
ATTACH_CHUNK: Final = 1000  # the generic schema caps a list of DIDs or replicas at 1000
PROXY_CLIENT_SITE: Final = "DESK"
LAKE_SITE: Final = "LAKE"

MiB: Final = 1 << 20
SIZES: Final = (0, 1, MiB - 1, MiB, MiB + 1, 64 * MiB, 1024 * MiB)
SCOPES: Final = ("lake", "physics", "user.demo")
ProgressFn = Callable[[str], None]


# --------------------------------------------------------------------------------------------------
# content and paths (pure)


def _block(key: str, did: str, index: int, length: int) -> bytes:
    # randbytes(n) is a prefix of randbytes(m) for n <= m when both are multiples of 4, so a
    # file's bytes do not depend on how they are generated, only on (key, did, offset).
    rounded = (length + 3) & ~3
    return random.Random(f"{key}\0{did}\0{index}").randbytes(rounded)[:length]


def content_blocks(key: str, did: str, size: int) -> Iterator[bytes]:
    """The bytes of seeded file ``did`` of ``size`` bytes, in blocks of at most 1 MiB."""
    for index in range((size + BLOCK - 1) // BLOCK):
        yield _block(key, did, index, min(BLOCK, size - index * BLOCK))


def content(key: str, did: str, size: int, offset: int = 0, length: int | None = None) -> bytes:
    """Bytes ``[offset, offset + length)`` of seeded file ``did`` (clipped to ``size``)."""
    end = size if length is None else min(size, offset + length)
    if offset >= end:
        return b""
    parts = []
    for index in range(offset // BLOCK, (end - 1) // BLOCK + 1):
        block = _block(key, did, index, min(BLOCK, size - index * BLOCK))
        lo = max(offset - index * BLOCK, 0)
        hi = min(end - index * BLOCK, BLOCK)
        parts.append(block[lo:hi])
    return b"".join(parts)


def hash_path(scope: str, name: str) -> str:
    """Rucio 41's ``hash`` lfn2pfn path (rucio.rse.translation): ``<scope>/<md5[0:2]>/<md5[2:4]>/<name>``.

    The md5 is of ``scope:name``; ``user.*``/``group.*`` scopes get their dots turned into
    slashes; the name is appended as is, so a ``/`` in it makes subdirectories and a leading
    ``/`` gives a double slash in the PFN.
    """
    digest = hashlib.md5(f"{scope}:{name}".encode()).hexdigest()
    if scope.startswith(("user", "group")):
        scope = scope.replace(".", "/")
    return f"{scope}/{digest[0:2]}/{digest[2:4]}/{name}"


def rse_file(rse_dir: Path, scope: str, name: str) -> Path:
    """Where the replica of ``scope:name`` lives in an RSE directory (the filesystem merges ``//``)."""
    relative = os.path.normpath(hash_path(scope, name).replace("//", "/"))
    path = rse_dir / relative
    if relative.startswith("..") or os.path.isabs(relative):
        raise ValueError(f"{scope}:{name} would leave the RSE directory")
    return path


@dataclass(frozen=True, slots=True)
class FileSpec:
    scope: str
    name: str
    size: int

    @property
    def did(self) -> str:
        return f"{self.scope}:{self.name}"

    def as_ref(self) -> dict[str, str]:
        return {"scope": self.scope, "name": self.name}


@dataclass(frozen=True, slots=True)
class Written:
    spec: FileSpec
    adler32: str
    md5: str

    def as_did(self) -> dict[str, Any]:
        return {
            "scope": self.spec.scope,
            "name": self.spec.name,
            "bytes": self.spec.size,
            "adler32": self.adler32,
            "md5": self.md5,
        }


def write_file(rse_dir: Path, key: str, spec: FileSpec) -> Written:
    """Write the deterministic content of ``spec`` into ``rse_dir`` and return its checksums."""
    path = rse_file(rse_dir, spec.scope, spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    adler, md5 = 1, hashlib.md5()
    # a short temporary name: the final one may already be at the 255-byte limit
    tmp = path.with_name(f".seed-{os.getpid()}.part")
    with open(tmp, "wb") as fh:
        for block in content_blocks(key, spec.did, spec.size):
            adler = zlib.adler32(block, adler)
            md5.update(block)
            fh.write(block)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return Written(spec, f"{adler & 0xFFFFFFFF:08x}", md5.hexdigest())


# --------------------------------------------------------------------------------------------------
# the seed plan


def _small(scope: str, names: Iterable[str], size: int = 1000) -> list[FileSpec]:
    return [FileSpec(scope, name, size) for name in names]


def _many(scope: str, dataset: str, count: int) -> list[FileSpec]:
    width = len(str(count - 1))
    return [FileSpec(scope, f"{dataset}.f{i:0{width}d}.dat", 100 + (i * 37) % 900) for i in range(count)]


LONG_NAME: Final = ("long_name_" + "0123456789" * 25)[:246] + ".txt"
ESCAPED_NAMES: Final = (
    "dir/sub/file.txt",
    "/leading_slash.txt",
    "2024/run-1/part.0.dat",
    LONG_NAME,
)
# Climbs four levels from <scope>/<h>/<h>/: Rucio accepts it, nginx serves it at the normalised
# path, XrdHttp answers 403. Only the catalogue and the https door can be relied on for it.
TRAVERSAL_NAME: Final = "dots/../../../../escape.txt"
METADATA_DATASETS: Final[Mapping[str, Mapping[str, str | int]]] = {
    "data18.00350000.RAW": {"run_number": 350000, "datatype": "RAW", "project": "data18"},
    "data18.00350000.AOD": {"run_number": 350000, "datatype": "AOD", "project": "data18"},
    "data18.00350100.RAW": {"run_number": 350100, "datatype": "RAW", "project": "data18"},
    "data17.00340000.RAW": {"run_number": 340000, "datatype": "RAW", "project": "data17"},
}


@dataclass(frozen=True, slots=True)
class DatasetPlan:
    scope: str
    name: str
    files: tuple[FileSpec, ...]
    metadata: Mapping[str, str | int] | None = None


def base_datasets() -> list[DatasetPlan]:
    sized = tuple(FileSpec("lake", f"bytes_{size}.bin", size) for size in SIZES)
    shared = FileSpec("lake", "shared.txt", 4096)
    plans = [
        DatasetPlan("lake", "sizes", sized),
        DatasetPlan("lake", "shared_a", (shared, *_small("lake", ["only_a.txt"]))),
        DatasetPlan("lake", "shared_b", (shared, *_small("lake", ["only_b.txt"]))),
        DatasetPlan("lake", "cross_scope", tuple(_small("user.demo", [f"notes_{i}.txt" for i in range(3)]))),
        DatasetPlan("lake", "escaped/names", tuple(_small("lake", ESCAPED_NAMES))),
        DatasetPlan("lake", "traversal", tuple(_small("lake", [TRAVERSAL_NAME]))),
        DatasetPlan(
            "lake",
            "stage_me",
            (
                FileSpec("lake", "stage_me.a.bin", 64 << 10),
                FileSpec("lake", "stage_me.b.bin", MiB),
                FileSpec("lake", "stage_me.c.bin", 2 * MiB + 3),
            ),
        ),
        DatasetPlan("physics", "many_10k", tuple(_many("physics", "many_10k", 10_000))),
    ]
    for name, meta in METADATA_DATASETS.items():
        plans.append(
            DatasetPlan("physics", name, tuple(_small("physics", [f"{name}._0001.pool", f"{name}._0002.pool"])), meta)
        )
    return plans


# Rucio forbids mixed collections: a container holds datasets or containers, never both.
CONTAINERS: Final[Mapping[tuple[str, str], tuple[tuple[str, str], ...]]] = {
    ("lake", "collection"): (
        ("lake", "sizes"),
        ("lake", "shared_a"),
        ("lake", "cross_scope"),
        ("physics", "data18.00350000.RAW"),
    ),
    ("lake", "nested.inner"): (("lake", "shared_b"),),
    ("lake", "nested"): (("lake", "nested.inner"),),
    ("physics", "data18"): tuple(("physics", n) for n in METADATA_DATASETS if n.startswith("data18.")),
}


def roles(with_100k: bool) -> Seed:
    """The role -> DID map of this seed version."""
    return Seed(
        version=SEED_VERSION,
        content_key=CONTENT_KEY,
        origin_rse=ORIGIN_RSE,
        scratch_rse=SCRATCH_RSE,
        scopes=SCOPES,
        upload_scope="user.demo",
        container="lake:collection",
        nested_container="lake:nested",
        container_children=tuple(f"{s}:{n}" for s, n in CONTAINERS[("lake", "collection")]),
        sized_dataset="lake:sizes",
        sized_files={size: f"lake:bytes_{size}.bin" for size in SIZES},
        big_file=f"lake:bytes_{SIZES[-1]}.bin",
        dataset_10k="physics:many_10k",
        dataset_100k="physics:many_100k" if with_100k else None,
        multi_dataset_file="lake:shared.txt",
        multi_dataset_file_datasets=("lake:shared_a", "lake:shared_b"),
        cross_scope_dataset="lake:cross_scope",
        escaped_dataset="lake:escaped/names",
        escaped_names=tuple(f"lake:{n}" for n in ESCAPED_NAMES),
        long_name=f"lake:{LONG_NAME}",
        traversal_dataset="lake:traversal",
        traversal_name=f"lake:{TRAVERSAL_NAME}",
        stage_dataset="lake:stage_me",
        metadata_dataset=MetadataDataset("physics:data18.00350000.RAW", METADATA_DATASETS["data18.00350000.RAW"]),
        metadata_query=MetadataQuery(
            scope="physics",
            filter="run_number>=350000,datatype=RAW",
            expected=("physics:data18.00350000.RAW", "physics:data18.00350100.RAW"),
        ),
        proxy_client_site=PROXY_CLIENT_SITE,
    )


# --------------------------------------------------------------------------------------------------
# talking to rucio


def _protocols(lake: Lake) -> dict[str, list[dict[str, Any]]]:
    p = lake.ports
    tpc = {"read": 1, "write": 1, "delete": 1, "third_party_copy_read": 1, "third_party_copy_write": 1}
    return {
        ORIGIN_RSE: [
            # XrdHttp door of the origin: what datalakefs range-reads (top read priority)
            {
                "scheme": "http",
                "hostname": "127.0.0.1",
                "port": p["origin_http"],
                "prefix": f"/{ORIGIN_RSE}/",
                "impl": "rucio.rse.protocols.webdav.Default",
                "domains": {"lan": {"read": 1}, "wan": {"read": 1}},
            },
            {
                "scheme": "root",
                "hostname": "127.0.0.1",
                "port": p["origin_root"],
                "prefix": f"//{ORIGIN_RSE}/",
                "impl": "rucio.rse.protocols.xrootd.Default",
                "domains": {"lan": {"read": 2}, "wan": {"read": 2}},
            },
            # the same tree through nginx https: uploads, deletions, third-party copies
            {
                "scheme": "https",
                "hostname": "127.0.0.1",
                "port": p["dav_https"],
                "prefix": f"/{ORIGIN_RSE}/",
                "impl": "rucio.rse.protocols.webdav.NoRename",
                "domains": {"lan": {"read": 3, "write": 1, "delete": 1}, "wan": {**tpc, "read": 3}},
            },
        ],
        SCRATCH_RSE: [
            # NoRename: nginx answers MOVE with 204 where webdav.Default wants 201
            {
                "scheme": "https",
                "hostname": "127.0.0.1",
                "port": p["dav_https"],
                "prefix": f"/{SCRATCH_RSE}/",
                "impl": "rucio.rse.protocols.webdav.NoRename",
                "domains": {"lan": {"read": 1, "write": 1, "delete": 1}, "wan": dict(tpc)},
            },
            {
                "scheme": "http",
                "hostname": "127.0.0.1",
                "port": p["dav_http"],
                "prefix": f"/{SCRATCH_RSE}/",
                "impl": "rucio.rse.protocols.webdav.Default",
                "domains": {"lan": {"read": 2}, "wan": {"read": 2}},
            },
        ],
    }


def _protocol_key(proto: Mapping[str, Any]) -> tuple[Any, ...]:
    domains = {
        domain: tuple(sorted((op, prio) for op, prio in ops.items() if prio is not None))
        for domain, ops in (proto.get("domains") or {}).items()
    }
    return (
        proto["scheme"],
        proto["hostname"],
        int(proto["port"]),
        proto["prefix"],
        proto["impl"],
        tuple(sorted(domains.items())),
    )


def configure_rses(client: Client, lake: Lake) -> None:
    """Make both RSEs, their protocols, attributes, limits and distances match this lake's ports."""
    fts = lake.urls()["fts"]
    for rse, wanted in _protocols(lake).items():
        with contextlib.suppress(Duplicate):
            client.add_rse(rse, deterministic=True)
        try:
            existing = client.get_protocols(rse)
        except RSEProtocolNotSupported:
            existing = []
        wanted_keys = {_protocol_key(p) for p in wanted}
        have_keys = set()
        for proto in existing:
            if _protocol_key(proto) in wanted_keys:
                have_keys.add(_protocol_key(proto))
            else:
                client.delete_protocols(rse, proto["scheme"], hostname=proto["hostname"], port=proto["port"])
        for proto in wanted:
            if _protocol_key(proto) not in have_keys:
                client.add_protocol(rse, proto)
        client.add_rse_attribute(rse, "fts", fts)
        client.add_rse_attribute(rse, "site", LAKE_SITE)
        client.set_local_account_limit("root", rse, 10**15)
    for src, dst in ((ORIGIN_RSE, SCRATCH_RSE), (SCRATCH_RSE, ORIGIN_RSE)):
        with contextlib.suppress(Duplicate):
            client.add_distance(src, dst, {"distance": 1})
    # rucio rewrites PFNs as root://proxy//<pfn> for clients whose site differs from the RSE's;
    # only a forwarding-mode XCache can serve those (see notes on lake topology).
    client.set_config_option("root-proxy-internal", PROXY_CLIENT_SITE, f"127.0.0.1:{lake.ports['xcache_fwd_root']}")


def register_x509_identity(client: Client) -> None:
    """The demo user's DN as an X509 identity of root, for x509 / x509_proxy auth at the TLS front."""
    known = {(row["type"], row["identity"]) for row in client.list_identities("root")}
    if ("X509", USER_DN) not in known:
        client.add_identity("root", USER_DN, authtype="X509", email=IDENTITY_EMAIL)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def add_origin_dataset(
    client: Client, lake: Lake, plan: DatasetPlan, key: str = CONTENT_KEY, progress: ProgressFn | None = None
) -> list[Written]:
    """Create ``plan`` on LAKE-ORIGIN: the dataset, its files' bytes, replicas and attachments.

    Idempotent and resumable: files already attached to the dataset are neither rewritten nor
    registered again. Also the way tests make fresh origin-only datasets. Returns what it wrote.
    """
    try:
        client.add_dataset(plan.scope, plan.name)
        attached: set[tuple[str, str]] = set()
    except DataIdentifierAlreadyExists:
        attached = {(f["scope"], f["name"]) for f in client.list_files(plan.scope, plan.name)}
    missing = [spec for spec in plan.files if (spec.scope, spec.name) not in attached]
    written = [write_file(lake.layout.origin, key, spec) for spec in missing]
    # add_replicas (file DIDs + replicas, a no-op for an identical existing replica) then a plain
    # attach: about twice as fast as one attach that registers the replicas itself
    for index, chunk in enumerate(_chunks(written, ATTACH_CHUNK), start=1):
        client.add_replicas(ORIGIN_RSE, [w.as_did() for w in chunk])
        client.attach_dids_to_dids(
            [{"scope": plan.scope, "name": plan.name, "dids": [w.spec.as_ref() for w in chunk]}],
            ignore_duplicate=True,
        )
        if progress is not None and index % 10 == 0:
            done = min(index * ATTACH_CHUNK, len(written))
            progress(f"{plan.scope}:{plan.name}: {done:,} of {len(written):,} files registered")
    if plan.metadata:
        client.set_metadata_bulk(plan.scope, plan.name, dict(plan.metadata))
    return written


def _add_collections(client: Client) -> None:
    for scope, name in CONTAINERS:
        with contextlib.suppress(DataIdentifierAlreadyExists):
            client.add_container(scope, name)
    for (scope, name), children in CONTAINERS.items():
        client.attach_dids_to_dids(
            [{"scope": scope, "name": name, "dids": [{"scope": s, "name": n} for s, n in children]}],
            ignore_duplicate=True,
        )


def run(lake: Lake, *, with_100k: bool, progress: ProgressFn) -> Seed:
    """Bring the catalogue to this seed version (the parts not yet done) and write ``seed.json``."""
    started = time.monotonic()

    def step(message: str) -> None:
        progress(f"[seed {time.monotonic() - started:6.2f}s] {message}")

    client = Client()
    configure_rses(client, lake)
    register_x509_identity(client)
    state = _read_state(lake)
    parts = set(state.get("parts", [])) if state.get("version") == SEED_VERSION else set()
    wanted = {"base", "100k"} if with_100k else {"base"}
    if "base" not in parts:
        for scope in SCOPES:
            with contextlib.suppress(Duplicate):
                client.add_scope("root", scope)
        plans = base_datasets()
        for plan in plans:
            written = add_origin_dataset(client, lake, plan, progress=step)
            step(
                f"{plan.scope}:{plan.name}: {len(plan.files)} files"
                f" ({len(written)} written, {sum(w.spec.size for w in written):,} bytes)"
            )
        _add_collections(client)
        parts.add("base")
        _write_state(lake, parts, roles("100k" in parts))
        step("base seed done")
    if "100k" in wanted - parts:
        plan = DatasetPlan("physics", "many_100k", tuple(_many("physics", "many_100k", 100_000)))
        add_origin_dataset(client, lake, plan, progress=step)
        parts.add("100k")
        step("physics:many_100k: 100,000 files")
    seed = roles("100k" in parts)
    _write_state(lake, parts, seed)
    return seed


def _read_state(lake: Lake) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(lake.layout.seed_file.read_text())
    except FileNotFoundError:
        return {}
    return data


def _write_state(lake: Lake, parts: set[str], seed: Seed) -> None:
    data = {
        "file_version": SEED_FILE_VERSION,
        "version": SEED_VERSION,
        "parts": sorted(parts),
        "seed": seed.to_json(),
    }
    tmp = lake.layout.seed_file.with_name(".seed.json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, lake.layout.seed_file)
