"""The composition root: builds one mount's services from its Config and runs them.

This is the only place that chooses concrete classes (the Rucio catalogue, the stream reader, the
FUSE session). Services that run in the background start in one nursery owned here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from datalakefs import __version__
from datalakefs.cache.store import BlockCache
from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.catalogue.rucio import RucioCatalogue
from datalakefs.catalogue.rucio_upload import RucioUploader
from datalakefs.catalogue.upload import KillAtTransition
from datalakefs.config import Config
from datalakefs.errors import CatalogueUnavailableError
from datalakefs.fs.attributes import Ownership
from datalakefs.fs.filesystem import Filesystem
from datalakefs.fs.lake import LakeTree
from datalakefs.fs.outbox import OutboxTree
from datalakefs.fs.prefetch import ListingPrefetch
from datalakefs.fuse.operations import FuseOperations, forget_pages, invalidate_entry
from datalakefs.fuse.session import prepare_mountpoint, serve
from datalakefs.namespace.inodes import InodeTable
from datalakefs.namespace.tree import CONFIG_FILE, Namespace
from datalakefs.ops.metrics import MetricsEndpoint
from datalakefs.ops.rates import RateMeter
from datalakefs.outbox.journal import Journal
from datalakefs.outbox.service import Outbox
from datalakefs.redaction import redact_text
from datalakefs.staging.policy import StagingContent
from datalakefs.staging.rule import RuleStager
from datalakefs.staging.stream import ReplicaSource, StreamContent, StreamService
from datalakefs.transport.aio_bridge import AioBridge
from datalakefs.transport.deadlines import Deadline
from datalakefs.transport.http import HttpTransport, RequestAuth
from datalakefs.transport.storage import StorageClient
from datalakefs.transport.tokens import StorageAuth
from datalakefs.transport.trio_http import TrioRangeClient

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
OUTBOX_FILE = "outbox.json"


class Daemon:
    """One mount: catalogue, namespace, content service and the FUSE session."""

    def __init__(self, config: Config, mountpoint: str, target: str) -> None:
        """``target``: the mount point as :func:`prepare_mountpoint` checked it (before the outbox
        journal is opened, so that a second mount of the same place is refused for that reason)."""
        self.config = config
        self.mountpoint = os.path.abspath(mountpoint)
        self.target = target
        self.started = time.time()
        self.rucio = rucio = RucioCatalogue(config, token_dir=str(self.private_dir() / "rucio"))
        self.catalogue = CachedCatalogue(rucio, config)
        self.storage_auth = StorageAuth(ca_bundle=config.storage_ca_bundle,
                                        allow_token_over_http=config.allow_token_over_http)
        self.storage_auth.check()
        deadline = Deadline(base=config.http_timeout, min_rate=config.transfer_min_rate)
        self.content = stream_content(config, self.catalogue, self.storage_auth)
        self.stager = RuleStager(config, self.catalogue)
        self.staging = StagingContent(config, self.content, self.stager, self.catalogue)
        # The outbox belongs to the mount point: another mount with the same state_dir must neither
        # upload nor clean this one's spool.
        mount_key = self.private_dir().name
        hooks = KillAtTransition.from_environment(os.environ)  # crash tests only
        self.outbox = Outbox(
            Journal(config.state_dir / "outbox" / mount_key / "journal.sqlite"),
            RucioUploader(
                rucio, config, StorageClient(self.storage_auth, deadline, stall=config.http_timeout), hooks
            ),
            self.catalogue,
            (config.spool_dir or config.state_dir / "outbox") / mount_key / "spool",
            concurrency=config.upload_concurrency,
            reserve=config.spool_reserve,
            upload_while_writing=config.upload_while_writing,
            hooks=hooks,
        )
        control = {STATUS_FILE: self.render_status, OUTBOX_FILE: self.render_outbox, CONFIG_FILE: self.render_config}
        self.namespace = namespace = Namespace(self.catalogue, InodeTable(), config.scopes, tuple(control),
                                               listing_ttl=config.catalogue_ttl,
                                               times_limit=config.listing_times_limit)
        owner = Ownership(os.getuid() if config.uid is None else config.uid,
                          os.getgid() if config.gid is None else config.gid, config.umask, config.ro)
        # a read-only mount has no outbox to write into (uploads a former mount committed still go on)
        outbox_tree = None if config.ro else OutboxTree(self.outbox, namespace, self._visible_scopes, owner)
        if outbox_tree is not None:
            outbox_tree.invalidate_entry = invalidate_entry
        self.prefetch = ListingPrefetch(self.staging, config.listing_prefetch_files, config.listing_prefetch_bytes)
        lake = LakeTree(namespace, self.catalogue, self.staging, control, owner, stager=self.staging,
                        prefetch=self.prefetch)
        lake.forget_pages = forget_pages
        self.filesystem = Filesystem(namespace, lake, outbox=outbox_tree)
        self.meter = RateMeter(self._counters)
        self.metrics_url: str | None = None
        self.operations = FuseOperations(self.filesystem, config.entry_timeout, config.attr_timeout,
                                         config.xattrs)

    def private_dir(self) -> Path:
        """This mount's own directory under the state dir (rucio's auth token cache lives there)."""
        digest = hashlib.sha256(self.mountpoint.encode()).hexdigest()[:16]
        return self.config.state_dir / "mounts" / digest

    def _counters(self) -> dict[str, float]:
        stats = self.content.statistics()
        return {"bytes_fetched": stats.bytes_fetched, "requests": stats.requests}

    def status(self) -> dict[str, Any]:
        rates = {f"{name}_per_s": rate for name, rate in self.meter.rates().items()}
        return {
            "rates": rates,
            "metrics": {"url": self.metrics_url},
            "version": __version__,
            "mountpoint": self.mountpoint,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "catalogue": self.catalogue.statistics().as_dict(),
            "listing": self.namespace.statistics(),
            "content": self.content.statistics().as_dict(),
            "prefetch": self.prefetch.statistics(),
            "storage_auth": self.storage_auth.describe(),
            "staging": self.staging.status(),
            "outbox": self.outbox.summary(),
        }

    def render_status(self) -> bytes:
        return (redact_text(json.dumps(self.status(), indent=1, sort_keys=True)) + "\n").encode()

    def render_outbox(self) -> bytes:
        document = {"summary": self.outbox.summary(), "files": self.outbox.listing()}
        return (redact_text(json.dumps(document, indent=1, sort_keys=True)) + "\n").encode()

    def render_config(self) -> bytes:
        """This mount's options, so that ``datalakefs stage|cache|outbox PATH`` act with the
        configuration of the mount PATH is under (no option holds a credential)."""
        return (json.dumps(self.config.as_dict(), indent=1, sort_keys=True) + "\n").encode()

    async def _visible_scopes(self) -> list[str]:
        scopes = await self.catalogue.list_scopes()
        return [s for s in scopes if s in self.config.scopes] if self.config.scopes else scopes

    def fuse_options(self) -> set[str]:
        options = {"fsname=datalakefs", "subtype=datalakefs", "default_permissions"}
        if self.config.allow_other:
            options.add("allow_other")
        if self.config.ro:
            options.add("ro")
        return options

    async def run(self, on_ready: Callable[[], None]) -> None:
        def ready() -> None:
            _notify_systemd("READY=1")
            on_ready()

        await self._authenticate()
        port = self.config.metrics_port
        metrics = await MetricsEndpoint.open(port, self.config.metrics_address) if port is not None else None
        async with trio.open_nursery() as services:
            await services.start(self.catalogue.run)
            await services.start(self.content.run)
            await services.start(self.prefetch.run)
            await services.start(self.filesystem.run)
            await services.start(self.stager.run)
            await services.start(self.outbox.run)
            services.start_soon(self.meter.run)
            if metrics is not None:
                services.start_soon(metrics.serve, self.status)
                self.metrics_url = metrics.url
            await serve(self.operations, self.operations.initialized, self.target, self.fuse_options(),
                        self.config.read_ahead_kb, ready)
            _notify_systemd("STOPPING=1")
            services.cancel_scope.cancel()
        self.outbox.close()


    async def _authenticate(self) -> None:
        """Refused credentials stop the mount here, with the reason; an outage does not (the mount
        answers EIO until the server is back, as it would for an outage later).

        The call that proves the credentials is the list of scopes, asked through the cached
        catalogue: the first lookup of any path needs it, and finds it cached. One request before
        the mount, and none at the first lookup (rucio's ``whoami`` cost two, its answer being a
        redirect to the account, and the first lookup a third)."""
        try:
            scopes = await self.catalogue.list_scopes()
        except CatalogueUnavailableError as exc:
            log.warning("event=catalogue-unavailable-at-mount reason=%s", exc)
        else:
            log.info("event=authenticated account=%s scopes=%d", self.rucio.account, len(scopes))


def stream_content(config: Config, catalogue: ReplicaSource, auth: RequestAuth | None = None) -> StreamContent:
    """Stream mode and its parts: the block cache, the aiohttp transport on its asyncio thread, and the
    trio client of small transfers, all with the one deadline policy."""
    deadline = Deadline(base=config.http_timeout, min_rate=config.transfer_min_rate)
    connect_timeout = min(10.0, config.http_timeout)
    bridge = AioBridge()
    transport = HttpTransport(bridge, stall_timeout=config.http_timeout, connect_timeout=connect_timeout, auth=auth,
                              deadline=deadline)
    pieces = TrioRangeClient(stall_timeout=config.http_timeout, connect_timeout=connect_timeout, auth=auth,
                             deadline=deadline)
    cache = BlockCache(config.cache_dir, capacity=config.cache_size, block_size=config.block_size)
    service = StreamService(cache, transport, config, piece_transport=pieces)
    return StreamContent(service, catalogue, bridge=bridge, pieces=pieces)


def _notify_systemd(message: str) -> None:
    """sd_notify without a library: one datagram to $NOTIFY_SOCKET when systemd asked for it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.send(message.encode())


def run(config: Config, mountpoint: str, on_ready: Callable[[], None]) -> None:
    """Run the daemon in this process until the mount ends."""
    daemon = Daemon(config, mountpoint, prepare_mountpoint(os.path.abspath(mountpoint)))
    trio.run(daemon.run, on_ready)
