"""The filesystem's FileContent in stream mode; see the package docstring."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import trio

from datalakefs.cache.layout import FileKey
from datalakefs.cache.store import CacheStatistics
from datalakefs.errors import TransferError
from datalakefs.model import DID, DIDInfo, FileReplicas
from datalakefs.staging.stream.fetch import StreamService, StreamStatistics
from datalakefs.staging.stream.reader import StreamReader
from datalakefs.transport.aio_bridge import AioBridge
from datalakefs.transport.failover import known_replicas
from datalakefs.transport.trio_http import TrioRangeClient

log = logging.getLogger(__name__)


class ReplicaSource(Protocol):
    """Where :class:`StreamContent` finds replicas (the cached catalogue)."""

    async def list_replicas(self, dids: list[DID]) -> list[FileReplicas]: ...

    async def locate(self, did: DID) -> FileReplicas | None: ...


class StreamContent:
    """The filesystem's ``FileContent`` in stream mode: runs the service and the transports it was given
    (the daemon builds them).

    The daemon must run it (``await nursery.start(content.run)``) before the mount serves reads;
    ``run`` opens the cache and starts the asyncio thread, and closes both, and the trio client's
    connections, when cancelled.
    """

    def __init__(self, service: StreamService, catalogue: ReplicaSource, *, bridge: AioBridge,
                 pieces: TrioRangeClient) -> None:
        self._service = service
        self._catalogue = catalogue
        self._bridge = bridge
        self._pieces = pieces
        self._serving = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cache = self._service.cache
        await cache.open()
        await trio.to_thread.run_sync(self._bridge.start)
        try:
            self._serving = True
            await self._service.run(task_status=task_status)
        finally:
            self._serving = False
            with trio.CancelScope(shield=True):
                await self._pieces.aclose()
                await self._bridge.aclose()
            cache.close()

    def _running(self) -> StreamService:
        if not self._serving:
            raise TransferError("stream mode is not running")
        return self._service

    async def open(self, info: DIDInfo, nonblocking: bool) -> StreamReader:
        catalogue = self._catalogue

        async def locate(confirmed: bool) -> FileReplicas:
            if confirmed:
                found = next((f for f in await catalogue.list_replicas([info.did]) if f.info.did == info.did), None)
            else:
                found = await catalogue.locate(info.did)
            return FileReplicas(info, found.replicas, found.presumed) if found is not None else FileReplicas(info, ())

        return self._running().open(info, locate)

    def warmed(self, info: DIDInfo) -> bool:
        """Whether the whole file is in the block cache: a warm has nothing to fetch."""
        return self._serving and info.size is not None and self._service.cache.is_complete(FileKey.of(info))

    async def warm(self, info: DIDInfo) -> None:
        """Fetch the whole file into the block cache (listing-order prefetch) without building its bytes; a
        cached file costs nothing."""
        if self.warmed(info):
            return
        reader = await self.open(info, nonblocking=False)
        try:
            await reader.fill()
        finally:
            await reader.close()

    async def page_in(self, infos: Sequence[DIDInfo]) -> None:
        """Have cached files read from the local disk into memory ahead of their reader
        (:meth:`BlockCache.page_in`); files not cached are left alone."""
        if self._serving:
            await self._service.cache.page_in([FileKey.of(info) for info in infos if info.size is not None])

    def open_replicas(self, file: FileReplicas) -> StreamReader:
        """A reader of ``file`` from exactly the replicas given (rule staging: the staged one)."""
        return self._running().open(file.info, known_replicas(file))

    def cached_bytes(self, info: DIDInfo) -> int:
        return self._service.cached_bytes(info) if self._serving else 0

    def state(self, info: DIDInfo) -> str:
        if not self._serving or info.size is None:
            return "stream"
        key = FileKey.of(info)
        cache = self._service.cache
        if cache.is_verified(key):
            return "stream: cached, verified"
        return f"stream: {cache.cached_bytes(key)} of {info.size} bytes cached"

    def statistics(self) -> StreamStatistics:
        """The service's statistics; all zero while it is not running."""
        if self._serving:
            return self._service.statistics()
        idle = CacheStatistics(self._service.cache.capacity, 0, 0, 0, 0, 0, 0, 0)
        return StreamStatistics(idle, 0, 0, 0, 0, 0, 0, 0, 0)

    async def clear(self) -> None:
        await self._running().clear()
