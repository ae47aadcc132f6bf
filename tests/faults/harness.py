"""Helpers of the stream tests: files, replicas and a running stream service over a real transport."""

from __future__ import annotations

import random
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from datalakefs.cache.store import BlockCache
from datalakefs.config import Config
from datalakefs.model import DID, DIDInfo, DIDType, FileReplicas, Replica
from datalakefs.staging.stream import StreamReader, StreamService, StreamStatistics, known_replicas
from datalakefs.transport.aio_bridge import AioBridge
from datalakefs.transport.http import HttpTransport
from datalakefs.transport.trio_http import TrioRangeClient

BS = 1 << 20


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def info_of(name: str, data: bytes, adler: int | None = None) -> DIDInfo:
    value = zlib.adler32(data) if adler is None else adler
    return DIDInfo(DID("test", name), DIDType.FILE, size=len(data), adler32=f"{value:08x}")


def open_reader(service: StreamService, info: DIDInfo, *urls: str) -> StreamReader:
    replicas = tuple(Replica(f"RSE{i}", url) for i, url in enumerate(urls))
    return service.open(info, known_replicas(FileReplicas(info, replicas)))


@asynccontextmanager
async def running(
    root: Path,
    *,
    capacity: int = 1 << 30,
    retries: int = 2,
    stall: float = 0.5,
    config: Config | None = None,
    max_request: int = 64 * BS,
) -> AsyncIterator[StreamService]:
    """A stream service over a real bridge, HTTP transport and block cache under ``root``."""
    config = (config or Config()).replace(cache_dir=root, http_retries=retries)
    with AioBridge() as bridge:
        cache = BlockCache(root, capacity=capacity, block_size=BS)
        await cache.open()
        transport = HttpTransport(bridge, stall_timeout=stall, connect_timeout=2)
        pieces = TrioRangeClient(stall_timeout=stall, connect_timeout=2)
        service = StreamService(cache, transport, config, retry_backoff=0.01, max_request=max_request,
                                piece_transport=pieces)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                yield service
                nursery.cancel_scope.cancel()
        finally:
            await pieces.aclose()
            cache.close()


async def transfers_ended(statistics: Callable[[], StreamStatistics]) -> None:
    """Until no transfer runs: every block they fetched is then committed to the cache (a block
    written past the page cache reaches its readers before its write ends, and the cache after)."""
    with trio.fail_after(20):
        while statistics().transfers_in_flight:  # noqa: ASYNC110
            await trio.sleep(0.01)  # no event to wait on: the transfers' tasks end


async def read_all(reader: StreamReader, chunk: int = 128 << 10) -> bytes:
    out = bytearray()
    while len(out) < reader.size:
        out += await reader.read(len(out), chunk)
    return bytes(out)


def ranges(gets: dict[str | None, int]) -> list[tuple[int, int]]:
    """The (start, end-exclusive) of each range GET, sorted."""
    found = []
    for header in gets:
        assert header is not None
        start, end = header.removeprefix("bytes=").split("-")
        found.append((int(start), int(end) + 1))
    return sorted(found)
