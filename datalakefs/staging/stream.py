"""Stream mode: reads served from the verified block cache, missing blocks fetched with range GETs.

The filesystem gets one :class:`StreamReader` per open file (through :class:`StreamContent`, or
:meth:`StreamService.open`) and calls ``await reader.read(offset, size)`` from its read handler.

**Hits** are served inline: ``os.pread`` on the cache's data file, verified by the cache, with no thread hop
and no await.

**Misses and prefetch.**

* A block is transferred at most once at a time however many readers wait for it (single flight:
  one service-wide map of pending blocks; waiters sleep on a ``trio.Event``).
* A reader is *sequential* while each read starts within :data:`SEQUENTIAL_SLACK` blocks of the
  furthest point read so far (the kernel may deliver read-ahead requests slightly out of order). Its
  read-ahead window starts at one block (at least 1 MiB) and doubles each time it reaches a new block,
  up to ``prefetch_max`` (and at most a quarter of the cache). When less than half a window is left
  ahead of the reader, the window's missing blocks are requested at once, so requests are large and
  overlap. A random read of a large span fetches exactly the blocks it touches.
* A **small random read** (less than half a block, e.g. the kernel's 4 KiB READ for a random ``pread``)
  whose blocks are neither cached nor on the way is a *piece read*: one closed-range GET of just the
  4 KiB pages it covers, answered from memory and not cached (a block cache of 1 MiB blocks would
  otherwise move 256× the bytes asked for: 2,000 random 4 KiB reads of a 1 GiB file touch 86 % of its
  blocks). Pieces are single flight too (one GET per distinct piece however many readers wait), fail
  over like blocks, and are checked like every transfer (status, Content-Range, exact body length); a
  piece has no checksum of its own in the catalogue, so it is not adler32-verified. Pieces of plain
  ``http://`` URLs are fetched on the trio thread (:mod:`datalakefs.transport.trio_http`): no thread
  hop, which on a local link costs more than the GET itself; other URLs go through aiohttp. So is a
  transfer of a small file's blocks (at most ``INLINE_TRANSFER_MAX`` bytes, e.g. every file of a
  dataset of small files): fetched and written to the cache on the trio thread, which a whole file of
  a few KiB costs less than the two thread hops and aiohttp's per-request work. Once a reader turns
  sequential its window fetches whole blocks into the cache as above. ``piece_reads = false`` turns
  pieces off: every read then fetches, caches and verifies whole blocks.
* Missing consecutive blocks are fetched with one closed-range GET per ``max_request`` bytes (64 MiB:
  measured here against a local XrdHttp, one GET per stretch beat 16 MiB pieces, 918 vs 764 MB/s and
  1.29 vs 1.45 CPU s/GiB, as the transport notes predicted for aiohttp). The body
  is written to the cache's data file on the transport's thread; trio is woken once per landed block (with
  ``TrioToken.run_sync_soon``) to commit it to the cache and wake its waiters, so a reader needing the
  first block of a 32 MiB request does not wait for the rest.
* Transfers run in the service's nursery, not in the readers' tasks: an interrupted reader does not
  cancel a transfer that others wait for.

**Replicas and failover.** Each reader has candidate URLs (XCache first; see
:mod:`datalakefs.transport.replicas`), looked up on its first miss, so opening a file costs nothing. A
failed attempt (5xx, timeout, reset, short body, wrong range reply) moves on to the next candidate at
once, resuming at the first block that has not arrived; after every candidate failed, the transfer waits
(``retry_backoff``, doubling) and tries them all again, ``Config.http_retries`` more times. Candidates
that answered 401/403/404 are not asked again by that transfer. A reader starts with the candidate that
last worked for it, or with the one after the candidate that last failed. When every attempt failed,
the waiters get ``TransferError`` (EIO) listing each attempt's reason, as the log does;
``AccessDeniedError`` (EACCES) when every candidate refused access.

**Verification.** Every block is checked by the cache on every read. Once a file's last block is in
the cache, the next read checks the whole file's adler32 against the catalogue before returning
anything; on a mismatch the cache drops the file's blocks and that read raises ``TransferError``.

**Disk trouble.** A block that cannot be written to the cache (disk full, I/O error) is given to its
readers from a small in-memory buffer; on ENOSPC the cache also evicts a tenth of its blocks. Reads keep
working.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import trio

from datalakefs.cache.layout import MIB, FileKey, block_count
from datalakefs.cache.store import BlockCache, CacheStatistics, VerifyResult
from datalakefs.cache.writer import LandedBlock
from datalakefs.config import Config
from datalakefs.errors import DatalakeError, TransferError
from datalakefs.model import DID, DIDInfo, FileReplicas
from datalakefs.transport.aio_bridge import AioBridge
from datalakefs.transport.deadlines import Deadline
from datalakefs.transport.failover import Failover, Locate, ReplicaChoice, known_replicas
from datalakefs.transport.http import HttpTransport, RangeSink, RequestAuth
from datalakefs.transport.replicas import Candidate
from datalakefs.transport.trio_http import TrioRangeClient

log = logging.getLogger(__name__)

SEQUENTIAL_SLACK = 4  # blocks
PIECE_ALIGN = 4096  # piece reads fetch whole pages
#: a transfer of at most this many bytes (a small file) runs on the trio thread when its URL allows
INLINE_TRANSFER_MAX = 256 << 10


class RangeTransport(Protocol):
    """What the service needs from the transport (:class:`HttpTransport` in production)."""

    async def fetch(self, url: str, start: int, length: int, total: int, sink: RangeSink) -> None: ...


class PieceTransport(RangeTransport, Protocol):
    """A transport for piece reads that takes only some URLs (:class:`TrioRangeClient` in production)."""

    def supports(self, url: str) -> bool: ...


class ReplicaSource(Protocol):
    """Where :class:`StreamContent` finds replicas (the cached catalogue)."""

    async def list_replicas(self, dids: list[DID]) -> list[FileReplicas]: ...

    async def locate(self, did: DID) -> FileReplicas | None: ...


@dataclass(frozen=True, slots=True)
class StreamStatistics:
    """A snapshot of stream-mode counters (since the service started) and of the cache."""

    cache: CacheStatistics
    hits: int  # blocks found in the cache when a read first looked
    misses: int
    requests: int  # range GETs started
    failed_requests: int
    bytes_fetched: int  # bytes of blocks that arrived
    bypassed_blocks: int  # blocks handed over from memory because the disk could not take them
    verified_files: int
    transfers_in_flight: int
    piece_requests: int = 0  # small random reads answered by a GET of just their pages (not cached)

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["hit_rate"] = round(self.hit_rate, 4)
        return result


class _Pending:
    """A block on its way; ``error`` is set when its transfer gave up."""

    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.error: DatalakeError | None = None


class _Piece:
    """A piece read on its way: the bytes ``[start, end)`` of one file, fetched into memory."""

    __slots__ = ("data", "end", "error", "event", "filled", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.data = bytearray(end - start)
        self.filled = 0
        self.event = trio.Event()
        self.error: DatalakeError | None = None

    def write(self, offset: int, data: bytes) -> None:  # RangeSink, on the transport thread
        at = offset - self.start
        self.data[at : at + len(data)] = data
        self.filled = at + len(data)

    def close(self) -> None:
        pass


def _fresh(error: DatalakeError) -> DatalakeError:
    """A new exception of the same class and text: one instance is never raised by two tasks."""
    return type(error)(str(error))


class _Run:
    """One transfer: blocks ``[first, end)`` of a file, all pending when it starts."""

    __slots__ = ("key", "pending", "reader", "service")

    def __init__(self, service: StreamService, reader: StreamReader, first: int, end: int) -> None:
        self.service = service
        self.reader = reader
        self.key = reader.key
        self.pending: dict[int, _Pending] = {}
        for index in range(first, end):
            pending = self.pending[index] = _Pending()
            service._pending[(self.key.digest, index)] = pending

    def remaining(self) -> tuple[int, int] | None:
        if not self.pending:
            return None
        return min(self.pending), max(self.pending) + 1

    def land(self, index: int) -> None:
        pending = self.pending.pop(index, None)
        if pending is not None:
            self._release(index, pending)

    def fail(self, error: DatalakeError) -> None:
        for index, pending in self.pending.items():
            pending.error = error
            self._release(index, pending)
        self.pending.clear()

    def _release(self, index: int, pending: _Pending) -> None:
        slot = (self.key.digest, index)
        if self.service._pending.get(slot) is pending:
            del self.service._pending[slot]
        pending.event.set()


class StreamService:
    """Stream-mode reads for every open file of a mount; see the module docstring.

    Start it with ``await nursery.start(service.run)``; readers work while ``run`` runs. Everything
    here is called on the trio thread.
    """

    def __init__(
        self,
        cache: BlockCache,
        transport: RangeTransport,
        config: Config,
        *,
        max_request: int = 64 * MIB,
        max_transfers: int = 16,
        retry_backoff: float = 0.5,
        piece_transport: PieceTransport | None = None,
    ) -> None:
        self.cache = cache
        self._transport = transport
        self._piece_transport = piece_transport
        self.config = config
        self.block_size = cache.block_size
        self._max_request_blocks = max(1, max_request // self.block_size)
        self._window_max = max(self.block_size, min(config.prefetch_max, cache.capacity // 4))
        self._failover = Failover(retries=config.http_retries, backoff=retry_backoff)
        self._limiter = trio.CapacityLimiter(max_transfers)
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._pieces: dict[tuple[str, int, int], _Piece] = {}
        self.piece_max = self.block_size // 2 if config.piece_reads else 0
        self._bypass: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bypass_max = max(4, self._window_max // self.block_size)
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._hits = 0
        self._misses = 0
        self._requests = 0
        self._bytes = 0
        self._bypassed = 0
        self._verified = 0
        self._transfers = 0
        self._piece_requests = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the transfers until cancelled; then every waiting read fails with TransferError."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def open(self, info: DIDInfo, locate: Locate) -> StreamReader:
        """A reader for the file ``info``; ``locate`` is awaited for its replicas on the first miss."""
        if info.size is None:
            raise TransferError(f"{info.did}: the catalogue gives no size")
        return StreamReader(self, FileKey.of(info), locate)

    def cached_bytes(self, info: DIDInfo) -> int:
        """Bytes of the file in the cache (``user.datalakefs.cached``)."""
        if info.size is None:
            return 0
        return self.cache.cached_bytes(FileKey.of(info))

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(
            cache=self.cache.statistics(),
            hits=self._hits,
            misses=self._misses,
            requests=self._requests,
            failed_requests=self._failover.failed_attempts,
            bytes_fetched=self._bytes,
            bypassed_blocks=self._bypassed,
            verified_files=self._verified,
            transfers_in_flight=self._transfers,
            piece_requests=self._piece_requests,
        )

    async def clear(self) -> None:
        """Drop every cached block (blocks of running transfers are fetched again for their readers)."""
        self._bypass.clear()
        await self.cache.clear()

    # ---- reading ------------------------------------------------------------------------------

    def _read_block(self, key: FileKey, index: int, start: int, length: int) -> bytes | None:
        data = self.cache.read(key, index, start, length)
        if data is None and self._bypass:
            block = self._bypass.get((key.digest, index))
            if block is not None:
                data = block[start : start + length]
        return data

    async def _wait_block(self, reader: StreamReader, index: int, start: int, length: int) -> bytes:
        slot = (reader.key.digest, index)
        # A block can vanish between landing and this read only if the cache is tiny or it was
        # corrupted at once; a few rounds tell that apart from a transient race.
        for _ in range(3):
            pending = self._pending.get(slot)
            if pending is None:
                self.request(reader, index, index + 1)
                pending = self._pending.get(slot)
            if pending is not None:
                await pending.event.wait()
                if pending.error is not None:
                    raise _fresh(pending.error)
            data = self._read_block(reader.key, index, start, length)
            if data is not None:
                return data
        raise TransferError(
            f"{reader.key.did}: block {index} left the cache as soon as it arrived (cache too small?)"
        )

    def _read_cached(self, key: FileKey, offset: int, end: int) -> bytes | None:
        """Bytes ``[offset, end)`` when every block of the span is cached, else None."""
        bs = self.block_size
        pieces = []
        for index in range(offset // bs, (end - 1) // bs + 1):
            start = max(offset - index * bs, 0)
            data = self._read_block(key, index, start, min(end - index * bs, bs) - start)
            if data is None:
                return None
            pieces.append(data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _in_flight(self, key: FileKey, offset: int, end: int) -> bool:
        bs = self.block_size
        return any((key.digest, index) in self._pending for index in range(offset // bs, (end - 1) // bs + 1))

    async def _read_piece(self, reader: StreamReader, offset: int, end: int) -> bytes:
        """Bytes ``[offset, end)`` through a piece read of the pages they cover (single flight)."""
        key = reader.key
        start = offset // PIECE_ALIGN * PIECE_ALIGN
        stop = min(key.size, -(-end // PIECE_ALIGN) * PIECE_ALIGN)
        slot = (key.digest, start, stop)
        piece = self._pieces.get(slot)
        if piece is None:
            if self._nursery is None:
                raise TransferError("the stream service is not running")
            piece = self._pieces[slot] = _Piece(start, stop)
            self._nursery.start_soon(self._piece_transfer, reader, slot, piece)
        await piece.event.wait()
        if piece.error is not None:
            raise _fresh(piece.error)
        return bytes(piece.data[offset - start : end - start])

    async def _piece_transfer(self, reader: StreamReader, slot: tuple[str, int, int], piece: _Piece) -> None:
        async def attempt(candidate: Candidate) -> None:
            self._requests += 1
            self._piece_requests += 1
            quick = self._piece_transport
            transport = quick if quick is not None and quick.supports(candidate.url) else self._transport
            await transport.fetch(candidate.url, piece.start, piece.end - piece.start, reader.key.size, piece)
            self._bytes += piece.end - piece.start

        try:
            async with self._limiter:
                await self._failover.run(reader.replicas, attempt, f"piece {piece.start}..{piece.end}")
        except DatalakeError as exc:
            piece.error = _fresh(exc)
        except Exception as exc:  # a bug must fail this piece's reads, not the whole service
            log.exception("%s: piece read failed unexpectedly", reader.key.did)
            piece.error = TransferError(f"{reader.key.did}: internal error in a piece read: {exc!r}")
        finally:
            if piece.error is None and not piece.event.is_set() and piece.filled != piece.end - piece.start:
                piece.error = TransferError(f"{reader.key.did}: the piece read was stopped")
            if self._pieces.get(slot) is piece:
                del self._pieces[slot]
            piece.event.set()

    def _verify(self, key: FileKey) -> None:
        result = self.cache.verify(key)
        if result is VerifyResult.VERIFIED:
            self._verified += 1
        elif result is VerifyResult.MISMATCH:
            raise TransferError(
                f"{key.did}: the file's adler32 does not match the catalogue's; its cached blocks were "
                "dropped"
            )

    # ---- transfers ----------------------------------------------------------------------------

    def request(self, reader: StreamReader, first: int, end: int) -> None:
        """Start transfers for the blocks in ``[first, end)`` that are neither cached nor on the way."""
        digest = reader.key.digest
        run_start: int | None = None
        for index in range(first, end + 1):
            absent = (
                index < end
                and (digest, index) not in self._pending
                and (digest, index) not in self._bypass
                and not self.cache.has_block(reader.key, index)
            )
            if absent and run_start is None:
                run_start = index
            elif not absent and run_start is not None:
                self._start_runs(reader, run_start, index)
                run_start = None

    def _start_runs(self, reader: StreamReader, first: int, end: int) -> None:
        if self._nursery is None:
            raise TransferError("the stream service is not running")
        pieces = -(-(end - first) // self._max_request_blocks)
        for piece in range(pieces):
            start = first + (end - first) * piece // pieces
            stop = first + (end - first) * (piece + 1) // pieces
            self._nursery.start_soon(self._transfer, _Run(self, reader, start, stop))

    async def _transfer(self, run: _Run) -> None:
        self._transfers += 1
        first, end = run.remaining() or (0, 0)
        try:
            async with self._limiter:
                await self._failover.run(run.reader.replicas, functools.partial(self._attempt, run),
                                         f"blocks {first}..{end - 1}")
        except DatalakeError as exc:
            run.fail(_fresh(exc))
        except Exception as exc:  # a bug must fail this transfer's reads, not the whole service
            log.exception("%s: transfer failed unexpectedly", run.key.did)
            run.fail(TransferError(f"{run.key.did}: internal error in the transfer: {exc!r}"))
        finally:
            self._transfers -= 1
            if run.pending:  # cancelled (the service stops): an error only for who still waits
                run.fail(TransferError(f"{run.key.did}: the transfer was stopped"))

    async def _attempt(self, run: _Run, candidate: Candidate) -> str | None:
        """One attempt of ``run`` from ``candidate`` (a failover :data:`Attempt`)."""
        span = run.remaining()
        if span is None:
            return None
        first, end = span
        key = run.key
        start = first * self.block_size
        length = min(key.size, end * self.block_size) - start
        self._requests += 1
        quick = self._piece_transport
        transport: RangeTransport
        on_block: Callable[[LandedBlock], None]
        if length <= INLINE_TRANSFER_MAX and quick is not None and quick.supports(candidate.url):
            # a small file (or tail): fetched and stored on this thread, without the two thread hops
            # and aiohttp's per-request work, which cost more than its bytes (see the module docstring)
            transport, on_block = quick, functools.partial(self._landed, run)
        else:
            transport, on_block = self._transport, self._landed_elsewhere(run)
        await transport.fetch(candidate.url, start, length, key.size, self.cache.writer(key, first, end, on_block))
        return None if run.remaining() is None else "some blocks could not be stored locally"

    def _landed_elsewhere(self, run: _Run) -> Callable[[LandedBlock], None]:
        """A block's arrival on the transport's thread, handed to :meth:`_landed` on the trio thread."""
        token = self._token
        assert token is not None

        def on_block(landed: LandedBlock) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._landed, run, landed)

        return on_block

    def _landed(self, run: _Run, landed: LandedBlock) -> None:
        """On the trio thread, for each block that arrived; must never raise (run_sync_soon callback)."""
        try:
            data = landed.data
            disk_full = landed.errno == errno.ENOSPC
            if data is None and not self.cache.commit(run.key, landed):
                # Its data file was dropped meanwhile (None: the waiters ask again), or the journal
                # could not be written (the bytes are still there: the disk is full).
                data = self.cache.salvage(run.key, landed)
                disk_full = data is not None
            if data is not None:
                self._bypassed += 1
                self._bypass[(run.key.digest, landed.index)] = data
                while len(self._bypass) > self._bypass_max:
                    self._bypass.popitem(last=False)
            if disk_full:
                self.cache.shrink()  # make room for the next blocks
            self._bytes += landed.length
        except Exception:
            log.exception("%s: block %d arrived but could not be recorded", run.key.did, landed.index)
        finally:
            run.land(landed.index)


class StreamReader:
    """One open file in stream mode (the filesystem's ``OpenFile``)."""

    keep_cache = True  # files are immutable: the kernel may keep their pages across opens

    def __init__(self, service: StreamService, key: FileKey, locate: Locate) -> None:
        self.key = key
        self.size = key.size
        self._service = service
        self.replicas = ReplicaChoice(key.did, locate, service.config)
        self._blocks = block_count(key.size, service.block_size)
        self._next = 0  # furthest offset read so far in the current sequential stretch
        self._far = -1  # furthest block reached in it
        self._window = service.block_size
        self._ahead = 0  # blocks before this index are cached or requested

    async def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer only at end of file); raises TransferError (EIO)."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        service = self._service
        bs = service.block_size
        first, last = offset // bs, (end - 1) // bs
        if not self._plan(offset, end, first, last):
            if end - offset <= service.piece_max and not service._in_flight(self.key, offset, end):
                data = service._read_cached(self.key, offset, end)
                if data is not None:
                    service._hits += last - first + 1
                    return data
                service._misses += last - first + 1
                return await service._read_piece(self, offset, end)
            service.request(self, first, last + 1)
        pieces = []
        for index in range(first, last + 1):
            start = max(offset - index * bs, 0)
            length = min(end - index * bs, bs) - start
            data = service._read_block(self.key, index, start, length)
            if data is None:
                service._misses += 1
                data = await service._wait_block(self, index, start, length)
            else:
                service._hits += 1
            pieces.append(data)
        cache = service.cache
        if not cache.is_verified(self.key) and cache.is_complete(self.key):
            service._verify(self.key)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _plan(self, offset: int, end: int, first: int, last: int) -> bool:
        """Classify the access and grow or reset the window; a sequential reader's window is requested
        here. Returns whether the access is sequential."""
        service = self._service
        bs = service.block_size
        slack = SEQUENTIAL_SLACK * bs
        if self._next - slack <= offset <= self._next + slack:
            if last > self._far:
                self._window = min(self._window * 2, service._window_max)
                self._far = last
            self._next = max(self._next, end)
            window_blocks = self._window // bs
            if self._ahead - (last + 1) < window_blocks // 2:
                self._ahead = min(self._blocks, last + 1 + window_blocks)
                service.request(self, first, self._ahead)
            else:
                service.request(self, first, last + 1)
            return True
        self._window, self._far, self._next, self._ahead = bs, last, end, 0
        return False

    async def close(self) -> None:
        """Forget the handle; transfers it started go on for whoever else waits, and stay cached."""
        self._service.cache.touch(self.key)


class StreamContent:
    """The filesystem's ``FileContent`` in stream mode: builds and runs the transport, cache and service.

    The daemon must run it (``await nursery.start(content.run)``) before the mount serves reads;
    ``run`` owns the asyncio thread and closes it, and the cache's descriptors, when cancelled.
    """

    def __init__(self, config: Config, catalogue: ReplicaSource, auth: RequestAuth | None = None) -> None:
        self._config = config
        self._catalogue = catalogue
        self._auth = auth
        self._service: StreamService | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self._config
        cache = BlockCache(config.cache_dir, capacity=config.cache_size, block_size=config.block_size)
        await cache.open()
        bridge = AioBridge()
        await trio.to_thread.run_sync(bridge.start)
        deadline = Deadline(base=config.http_timeout, min_rate=config.transfer_min_rate)
        pieces = TrioRangeClient(stall_timeout=config.http_timeout, connect_timeout=min(10.0, config.http_timeout),
                                 auth=self._auth, deadline=deadline)
        try:
            transport = HttpTransport(
                bridge,
                stall_timeout=config.http_timeout,
                connect_timeout=min(10.0, config.http_timeout),
                auth=self._auth,
                deadline=deadline,
            )
            self._service = StreamService(cache, transport, config, piece_transport=pieces)
            await self._service.run(task_status=task_status)
        finally:
            self._service = None
            with trio.CancelScope(shield=True):
                await pieces.aclose()
                await bridge.aclose()
            cache.close()

    def _running(self) -> StreamService:
        if self._service is None:
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

    async def warm(self, info: DIDInfo) -> None:
        """Read the whole file into the block cache (listing-order prefetch); a cached file costs nothing."""
        if self._service is not None and info.size is not None and self._service.cache.is_complete(FileKey.of(info)):
            return
        reader = await self.open(info, nonblocking=False)
        try:
            await reader.read(0, info.size or 0)
        finally:
            await reader.close()

    def open_replicas(self, file: FileReplicas) -> StreamReader:
        """A reader of ``file`` from exactly the replicas given (rule staging: the staged one)."""
        return self._running().open(file.info, known_replicas(file))

    def cached_bytes(self, info: DIDInfo) -> int:
        return self._service.cached_bytes(info) if self._service is not None else 0

    def state(self, info: DIDInfo) -> str:
        if self._service is None or info.size is None:
            return "stream"
        key = FileKey.of(info)
        cache = self._service.cache
        if cache.is_verified(key):
            return "stream: cached, verified"
        return f"stream: {cache.cached_bytes(key)} of {info.size} bytes cached"

    def statistics(self) -> StreamStatistics:
        """The service's statistics; all zero while it is not running."""
        if self._service is not None:
            return self._service.statistics()
        idle = CacheStatistics(self._config.cache_size, 0, 0, 0, 0, 0, 0, 0)
        return StreamStatistics(idle, 0, 0, 0, 0, 0, 0, 0, 0)

    async def clear(self) -> None:
        await self._running().clear()
