"""The staging policy: which path an ``open()`` takes, as the filesystem's ``FileContent``.

``staging = stream``: every file is streamed (:class:`~datalakefs.staging.stream.StreamContent`).

``staging = rule``: a file is read from its replica on ``staging_rse``. When it is not there yet, the
:class:`~datalakefs.staging.rule.RuleStager` makes (or reuses) a rule and ``open()`` waits for it
(``TryAgainError``/EAGAIN with ``O_NONBLOCK`` or after ``staging_timeout``, ``TransferError``/EIO when
the rule is STUCK).

``staging = auto``: a file with a streamable replica (HTTP, or anything through the XCache) opens as
a :class:`HybridFile` at once, as in stream mode: it is streamed while the stager looks for its
replica on the staging RSE in the background; when that replica is being copied (a rule, e.g.
``datalakefs stage`` of its dataset, is replicating it) the stager follows it, and the first read after
it is AVAILABLE (or the first read at all, when it already was) switches to the staged replica. A file
without a streamable replica is staged by rule as above.

**Where a staged replica is read from.** Its PFN is mapped to a local file through
``staging_local_paths`` (``<pfn-prefix>=<local-dir>``, longest prefix first); a local file of the
catalogue's size is read with ``os.pread`` inline (local disk, like a cache hit). Otherwise it is read
over HTTP from that replica only, through the block cache of stream mode. A staged replica was
verified by the transfer that made it (checksums, FTS and Rucio), so local reads are not verified again.

An open in ``rule`` costs one uncached catalogue call (the file's replica on the staging RSE); one in
``auto`` waits only for the (cached) replica lookup that stream mode makes on its first read anyway.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.config import Config
from datalakefs.errors import ConfigError, InvalidNameError
from datalakefs.model import DIDInfo, DIDType, FileReplicas, ReadBuffer, Replica, RSEReplica
from datalakefs.staging.rule import RuleStager, Staging
from datalakefs.staging.stream import StreamContent, StreamReader
from datalakefs.transport.replicas import candidates

log = logging.getLogger(__name__)

_STAGE_VALUES = frozenset({"1", "true", "yes"})


def parse_local_paths(entries: Sequence[str]) -> list[tuple[str, Path]]:
    """``<pfn-prefix>=<local-dir>`` entries as pairs, longest prefix first."""
    pairs = []
    for entry in entries:
        prefix, sep, local = entry.rpartition("=")
        if not sep or not prefix or not local:
            raise ConfigError(f"option staging_local_paths: {entry!r} is not <pfn-prefix>=<local-dir>")
        pairs.append((prefix, Path(local)))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def local_path(pfns: Sequence[str], mapping: Sequence[tuple[str, Path]]) -> Path | None:
    """The local file of the first PFN under a mapped prefix (no filesystem access)."""
    for pfn in pfns:
        for prefix, local in mapping:
            if pfn.startswith(prefix):
                relative = pfn[len(prefix):].lstrip("/")
                if ".." in Path(relative).parts:
                    continue
                return local / relative
    return None


class LocalFile:
    """A staged replica read straight from the staging RSE's local directory."""

    keep_cache = True

    def __init__(self, fd: int, size: int, counters: Counter[str]) -> None:
        self._fd = fd
        self._size = size
        self._counters = counters

    async def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, max(0, min(size, self._size - offset)), offset) if offset < self._size else b""
        self._counters["local_reads"] += 1
        self._counters["local_bytes"] += len(data)
        return data

    async def close(self) -> None:
        os.close(self._fd)


StagedFile = LocalFile | StreamReader


class HybridFile:
    """A file opened in ``auto``: streamed until the stager knows a staged replica of it (already
    there, or once a replicating rule's lock is OK), then read from that replica. The switch happens
    between two reads; the bytes are the same (DIDs are immutable)."""

    keep_cache = True

    def __init__(self, content: StagingContent, info: DIDInfo, streamed: StreamReader, tracked: Staging) -> None:
        self._content = content
        self._info = info
        self._streamed = streamed
        self._tracked: Staging | None = tracked
        self._staged: StagedFile | None = None

    async def read(self, offset: int, size: int) -> ReadBuffer:
        tracked = self._tracked
        if self._staged is None and tracked is not None and tracked.ready and tracked.replica is not None:
            self._staged = await self._content.open_staged(self._info, tracked.replica)
            self._content.counters["hybrid_switches"] += 1
            self._content.stager.release(tracked)
            self._tracked = None
        if self._staged is not None:
            self._content.counters["hybrid_staged_reads"] += 1
            return await self._staged.read(offset, size)
        self._content.counters["hybrid_streamed_reads"] += 1
        return await self._streamed.read(offset, size)

    async def close(self) -> None:
        if self._tracked is not None:
            self._content.stager.release(self._tracked)
            self._tracked = None
        await self._streamed.close()
        if self._staged is not None:
            await self._staged.close()


class StagingContent:
    """The filesystem's ``FileContent`` for every policy; also takes ``user.datalakefs.stage``."""

    def __init__(self, config: Config, stream: StreamContent, stager: RuleStager, catalogue: CachedCatalogue) -> None:
        if config.staging != "stream" and not config.staging_rse:
            raise ConfigError(f"option staging_rse: staging = {config.staging} needs a staging RSE")
        self._config = config
        self._stream = stream
        self.stager = stager
        self._catalogue = catalogue
        self._local = parse_local_paths(config.staging_local_paths)
        self.counters: Counter[str] = Counter()

    async def open(self, info: DIDInfo, nonblocking: bool) -> StreamReader | StagedFile | HybridFile:
        policy = self._config.staging
        if policy == "stream":
            return await self._stream.open(info, nonblocking)
        if policy == "auto" and await self._streamable(info):
            # like stream mode, the open waits for nothing more; the staging replica is looked up
            # in the background and reads switch to it once it is there
            self.counters["hybrid_opens"] += 1
            return HybridFile(self, info, await self._stream.open(info, nonblocking), self.stager.watch(info))
        replica = await self.stager.replica(info)
        if replica is not None and replica.available:
            self.stager.note_staged(info, replica)
            return await self.open_staged(info, replica)
        staged = await self.stager.stage_file(info, wait=not nonblocking, known=replica)
        return await self.open_staged(info, staged)

    async def open_staged(self, info: DIDInfo, replica: RSEReplica) -> StagedFile:
        """The staged replica: its local file when mapped and complete, else HTTP via the cache."""
        path = local_path(replica.pfns, self._local)
        if path is not None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                log.warning("%s: staged replica not readable at %s (%s); reading it over HTTP", info.did, path, exc)
            else:
                if os.fstat(fd).st_size == info.size:
                    self.counters["local_opens"] += 1
                    return LocalFile(fd, info.size, self.counters)
                os.close(fd)
                log.warning("%s: %s has the wrong size; reading the staged replica over HTTP", info.did, path)
        self.counters["staged_http_opens"] += 1
        replicas = tuple(Replica(replica.rse, pfn) for pfn in replica.pfns)
        return self._stream.open_replicas(FileReplicas(info, replicas))

    def warmed(self, info: DIDInfo) -> bool:
        """Whether :meth:`warm` has nothing to fetch: the file is cached, or the policy is not stream."""
        return self._config.staging != "stream" or self._stream.warmed(info)

    async def warm(self, info: DIDInfo) -> None:
        """Prefetch into the block cache in stream mode; the staging modes read from their rule's
        replica, which a prefetch must not create."""
        if self._config.staging == "stream":
            await self._stream.warm(info)

    async def page_in(self, infos: Sequence[DIDInfo]) -> None:
        """Cached files read from the local disk into memory ahead of their reader (stream mode)."""
        if self._config.staging == "stream":
            await self._stream.page_in(infos)

    async def _streamable(self, info: DIDInfo) -> bool:
        found = await self._catalogue.list_replicas([info.did])
        return any(candidates(f, self._config) for f in found if f.info.did == info.did)

    async def stage(self, info: DIDInfo, value: bytes) -> None:
        """``setfattr -n user.datalakefs.stage -v 1``: one rule for the DID (file or collection)."""
        if value.decode(errors="replace").strip().lower() not in _STAGE_VALUES:
            raise InvalidNameError("user.datalakefs.stage takes the value 1")
        self.counters["stage_requests"] += 1
        await self.stager.stage(info)

    async def look_up(self, info: DIDInfo) -> None:
        """Before ``user.datalakefs.state`` is read: learn rules on the staging RSE made elsewhere."""
        if self._config.staging_rse:
            await self.stager.look_up(info)

    def cached_bytes(self, info: DIDInfo) -> int:
        return self._stream.cached_bytes(info)

    async def clear(self) -> None:
        await self._stream.clear()

    def state(self, info: DIDInfo) -> str:
        described = self.stager.describe(info.did) if self._config.staging_rse else None
        if described is not None:
            return described
        if info.type is not DIDType.FILE:
            return "not staged"
        return self._stream.state(info)

    def status(self) -> dict[str, Any]:
        return {"policy": self._config.staging, **self.stager.status(), "reads": dict(self.counters)}
