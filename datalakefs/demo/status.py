"""Value types of the demo lake and their JSON form: what `datalakefs demo status --json` prints.

Tests, benchmarks and scripts read the lake through these types (or their JSON) and never hard-code
a DID, a port or a path. Invariants: every type is frozen; ``X.from_json(x.to_json()) == x``; a DID
is always written ``scope:name``; the JSON form uses only strings, numbers, booleans, null, lists
and objects with string keys (sizes become decimal strings as keys).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datalakefs.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Knobs:
    """The FTS shim's test knobs: a delay before each file copy, and a regex of URLs to fail."""

    delay: float = 0.0
    fail: str | None = None

    def __post_init__(self) -> None:
        if self.delay < 0:
            raise ConfigError("knob delay cannot be negative")
        if self.fail is not None:
            try:
                re.compile(self.fail)
            except re.error as exc:
                raise ConfigError(f"knob fail: {self.fail!r} is not a regular expression: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {"delay": self.delay, "fail": self.fail}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Knobs:
        return cls(delay=float(data.get("delay") or 0.0), fail=data.get("fail") or None)


@dataclass(frozen=True, slots=True)
class MetadataDataset:
    """A seeded dataset and the DID metadata it carries."""

    did: str
    metadata: Mapping[str, str | int]


@dataclass(frozen=True, slots=True)
class MetadataQuery:
    """A metadata filter on a scope and the DIDs it must return (order irrelevant)."""

    scope: str
    filter: str
    expected: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Seed:
    """Role -> DID map of the seeded catalogue. Every seeded file has a replica on ``origin_rse``.

    scopes                  the seeded scopes (a ``user.*`` one among them: its PFN paths use ``user/x/``)
    upload_scope            scope for test uploads and test datasets (unique names, please)
    container               a container of datasets, one of them in another scope
    container_children      its content, exactly
    nested_container        a container of containers
    sized_dataset           holds ``sized_files``: size in bytes -> file, 0 B to 1 GiB
    big_file                the 1 GiB file
    dataset_10k             10,000 small files
    dataset_100k            100,000 small files; None unless `up --with-100k`
    multi_dataset_file      a file attached to every dataset of ``multi_dataset_file_datasets``
    cross_scope_dataset     a dataset whose files all live in another scope
    escaped_dataset         a dataset with ``/`` in its name, holding ``escaped_names``: names with
                            ``/``, one starting with ``/``, and ``long_name`` (250 characters)
    traversal_dataset       holds ``traversal_name``, a name with ``../`` segments; its bytes are
                            only reachable through LAKE-ORIGIN's https door (XrdHttp answers 403)
    stage_dataset           a dataset only on LAKE-ORIGIN, for staging (tests that must see a real
                            transfer should make their own with seed.add_origin_dataset)
    metadata_dataset        a dataset and its DID metadata (run_number, datatype, project)
    metadata_query          a metadata filter and the DIDs it returns
    proxy_client_site       a client site for which Rucio rewrites PFNs to root://<xcache-fwd>//<pfn>

    The content of every seeded file is ``seed.content(content_key, did, size, offset, length)``.
    """

    version: int
    content_key: str
    origin_rse: str
    scratch_rse: str
    scopes: tuple[str, ...]
    upload_scope: str
    container: str
    nested_container: str
    container_children: tuple[str, ...]
    sized_dataset: str
    sized_files: Mapping[int, str]
    big_file: str
    dataset_10k: str
    dataset_100k: str | None
    multi_dataset_file: str
    multi_dataset_file_datasets: tuple[str, ...]
    cross_scope_dataset: str
    escaped_dataset: str
    escaped_names: tuple[str, ...]
    long_name: str
    traversal_dataset: str
    traversal_name: str
    stage_dataset: str
    metadata_dataset: MetadataDataset
    metadata_query: MetadataQuery
    proxy_client_site: str

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "content_key": self.content_key,
            "origin_rse": self.origin_rse,
            "scratch_rse": self.scratch_rse,
            "scopes": list(self.scopes),
            "upload_scope": self.upload_scope,
            "container": self.container,
            "nested_container": self.nested_container,
            "container_children": list(self.container_children),
            "sized_dataset": self.sized_dataset,
            "sized_files": {str(size): did for size, did in sorted(self.sized_files.items())},
            "big_file": self.big_file,
            "dataset_10k": self.dataset_10k,
            "dataset_100k": self.dataset_100k,
            "multi_dataset_file": self.multi_dataset_file,
            "multi_dataset_file_datasets": list(self.multi_dataset_file_datasets),
            "cross_scope_dataset": self.cross_scope_dataset,
            "escaped_dataset": self.escaped_dataset,
            "escaped_names": list(self.escaped_names),
            "long_name": self.long_name,
            "traversal_dataset": self.traversal_dataset,
            "traversal_name": self.traversal_name,
            "stage_dataset": self.stage_dataset,
            "metadata_dataset": {
                "did": self.metadata_dataset.did,
                "metadata": dict(self.metadata_dataset.metadata),
            },
            "metadata_query": {
                "scope": self.metadata_query.scope,
                "filter": self.metadata_query.filter,
                "expected": list(self.metadata_query.expected),
            },
            "proxy_client_site": self.proxy_client_site,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Seed:
        meta = data["metadata_dataset"]
        query = data["metadata_query"]
        return cls(
            version=int(data["version"]),
            content_key=data["content_key"],
            origin_rse=data["origin_rse"],
            scratch_rse=data["scratch_rse"],
            scopes=tuple(data["scopes"]),
            upload_scope=data["upload_scope"],
            container=data["container"],
            nested_container=data["nested_container"],
            container_children=tuple(data["container_children"]),
            sized_dataset=data["sized_dataset"],
            sized_files={int(size): did for size, did in data["sized_files"].items()},
            big_file=data["big_file"],
            dataset_10k=data["dataset_10k"],
            dataset_100k=data.get("dataset_100k"),
            multi_dataset_file=data["multi_dataset_file"],
            multi_dataset_file_datasets=tuple(data["multi_dataset_file_datasets"]),
            cross_scope_dataset=data["cross_scope_dataset"],
            escaped_dataset=data["escaped_dataset"],
            escaped_names=tuple(data["escaped_names"]),
            long_name=data["long_name"],
            traversal_dataset=data["traversal_dataset"],
            traversal_name=data["traversal_name"],
            stage_dataset=data["stage_dataset"],
            metadata_dataset=MetadataDataset(did=meta["did"], metadata=dict(meta["metadata"])),
            metadata_query=MetadataQuery(
                scope=query["scope"], filter=query["filter"], expected=tuple(query["expected"])
            ),
            proxy_client_site=data["proxy_client_site"],
        )


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """One process of the lake. ``healthy``: its PID is alive and it answers on its port(s)."""

    name: str
    description: str
    pid: int | None
    ports: Mapping[str, int]
    healthy: bool
    url: str | None = None

    @property
    def port(self) -> int | None:
        """The main port (the first one listed), None for a process without a listener."""
        return next(iter(self.ports.values()), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "pid": self.pid,
            "port": self.port,
            "ports": dict(self.ports),
            "healthy": self.healthy,
            "url": self.url,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceStatus:
        return cls(
            name=data["name"],
            description=data["description"],
            pid=data["pid"],
            ports={k: int(v) for k, v in data["ports"].items()},
            healthy=bool(data["healthy"]),
            url=data.get("url"),
        )


@dataclass(frozen=True, slots=True)
class X509Access:
    """What a rucio client needs for ``x509`` / ``x509_proxy`` auth at the lake's TLS front.

    auth_host   https URL of the TLS front (rucio.cfg ``auth_host``; ``rucio_host`` may stay http)
    ca_cert     the demo CA: it issued the front's server certificate and the user certificate
    user_cert   the user certificate (``client_cert``), its key ``user_key`` (``client_key``)
    proxy       an RFC 3820 proxy of the user certificate, cert+key+chain (``client_x509_proxy``)
    dn          the user's DN, an X509 identity of the account root
    """

    auth_host: str
    ca_cert: Path
    user_cert: Path
    user_key: Path
    proxy: Path
    dn: str

    def to_json(self) -> dict[str, Any]:
        return {
            "auth_host": self.auth_host,
            "ca_cert": str(self.ca_cert),
            "user_cert": str(self.user_cert),
            "user_key": str(self.user_key),
            "proxy": str(self.proxy),
            "dn": self.dn,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> X509Access:
        return cls(
            auth_host=data["auth_host"],
            ca_cert=Path(data["ca_cert"]),
            user_cert=Path(data["user_cert"]),
            user_key=Path(data["user_key"]),
            proxy=Path(data["proxy"]),
            dn=data["dn"],
        )


@dataclass(frozen=True, slots=True)
class LakeStatus:
    """Everything a client of the lake needs, as reported by `datalakefs demo status --json`."""

    state_dir: Path
    port_base: int
    healthy: bool
    services: Mapping[str, ServiceStatus]
    rucio_config: Path
    server_config: Path
    x509_user_proxy: Path
    datalakefs_config: Path
    mountpoint: Path | None
    mounted: bool
    urls: Mapping[str, str]
    paths: Mapping[str, Path]
    knobs: Knobs
    seed: Seed | None
    env: Mapping[str, str] = field(default_factory=dict)
    token_command: tuple[str, ...] = ()  # prints a valid bearer token; add --expired or --wrong-key
    x509: X509Access | None = None  # rucio x509 / x509_proxy auth at the TLS front

    def to_json(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.state_dir),
            "port_base": self.port_base,
            "healthy": self.healthy,
            "services": {name: s.to_json() for name, s in self.services.items()},
            "rucio_config": str(self.rucio_config),
            "server_config": str(self.server_config),
            "x509_user_proxy": str(self.x509_user_proxy),
            "datalakefs_config": str(self.datalakefs_config),
            "mountpoint": None if self.mountpoint is None else str(self.mountpoint),
            "mounted": self.mounted,
            "urls": dict(self.urls),
            "paths": {k: str(v) for k, v in self.paths.items()},
            "knobs": self.knobs.to_json(),
            "seed": None if self.seed is None else self.seed.to_json(),
            "env": dict(self.env),
            "token_command": list(self.token_command),
            "x509": None if self.x509 is None else self.x509.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LakeStatus:
        return cls(
            state_dir=Path(data["state_dir"]),
            port_base=int(data["port_base"]),
            healthy=bool(data["healthy"]),
            services={k: ServiceStatus.from_json(v) for k, v in data["services"].items()},
            rucio_config=Path(data["rucio_config"]),
            server_config=Path(data["server_config"]),
            x509_user_proxy=Path(data["x509_user_proxy"]),
            datalakefs_config=Path(data["datalakefs_config"]),
            mountpoint=None if data.get("mountpoint") is None else Path(data["mountpoint"]),
            mounted=bool(data["mounted"]),
            urls=dict(data["urls"]),
            paths={k: Path(v) for k, v in data["paths"].items()},
            knobs=Knobs.from_json(data["knobs"]),
            seed=None if data.get("seed") is None else Seed.from_json(data["seed"]),
            env=dict(data.get("env") or {}),
            token_command=tuple(data.get("token_command") or ()),
            x509=None if data.get("x509") is None else X509Access.from_json(data["x509"]),
        )
