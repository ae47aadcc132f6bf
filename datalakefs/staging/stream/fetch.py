"""The single-flight fetch of stream mode: blocks into the block cache, pieces into memory, each transfer
through the one failover loop; see the package docstring."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from datalakefs.cache.layout import MIB, FileKey
from datalakefs.cache.store import BlockCache, CacheStatistics, VerifyResult
from datalakefs.cache.writer import ArrivedBlock, LandedBlock, ResidentBytes
from datalakefs.config import Config
from datalakefs.errors import ChecksumMismatchError, DatalakeError, TransferError
from datalakefs.model import DIDInfo, ReadBuffer
from datalakefs.transport.failover import Failover, Locate
from datalakefs.transport.http import RangeSink
from datalakefs.transport.replicas import Candidate

if TYPE_CHECKING:
    from datalakefs.staging.stream.reader import StreamReader

log = logging.getLogger(__name__)

_Found = TypeVar("_Found")

PIECE_ALIGN = 4096  # piece reads fetch whole pages
#: Blocks read to their end that stay in memory, for a late read of them (the kernel's read-ahead may
#: deliver a block's pieces slightly out of order). Any more leave at once: their buffers go back to the
#: pool while still in the CPU's cache, and the transport receives the next blocks into them (a cold
#: buffer makes the socket's copy into it and its first touch cost more; see ARCHITECTURE.md).
BEHIND_BLOCKS = 8
#: The window is shared by at most this many streaming readers; beyond, each keeps this share of it
#: (8 MiB of the default 64): with less, a reader's requests (half a window each) no longer hide a
#: 30 ms round trip at the ~25 MB/s each of 16 readers gets (it waits for most blocks), while 16
#: such windows still fit in the memory that holds blocks not yet read (twice the window).
WINDOW_SHARES_MAX = 8
#: a transfer of at most this many bytes (a small file) runs on the trio thread when its URL allows
INLINE_TRANSFER_MAX = 256 << 10


class RangeTransport(Protocol):
    """What the service needs from the transport (:class:`HttpTransport` in production)."""

    async def fetch(self, url: str, start: int, length: int, total: int, sink: RangeSink) -> None: ...


class PieceTransport(RangeTransport, Protocol):
    """A transport for piece reads that takes only some URLs (:class:`TrioRangeClient` in production)."""

    def supports(self, url: str) -> bool: ...


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
    disk_reads: int = 0  # reads of a block answered from the cache's data file, not from memory

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["hit_rate"] = round(self.hit_rate, 4)
        return result


class _Pending:
    """A block on its way; ``error`` is set when its transfer gave up. ``awaited``: a reader waits for
    it (read and written under the :class:`LandingHandoff`'s lock)."""

    __slots__ = ("awaited", "error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.error: DatalakeError | None = None
        self.awaited = False


class _Writing:
    """A block its readers got as soon as it arrived, whose write to the cache's data file has not
    ended: a share of its bytes, and ``stored``, set once its :class:`LandedBlock` was dealt with
    (committed, or kept in memory when the disk failed)."""

    __slots__ = ("resident", "stored")

    def __init__(self, resident: ResidentBytes, stored: _Pending) -> None:
        self.resident = resident
        self.stored = stored


class _Piece:
    """A piece read on its way: the bytes ``[start, end)`` of one file, fetched into memory."""

    __slots__ = ("abandoned", "data", "end", "error", "event", "start")

    def __init__(self, start: int, end: int) -> None:
        self.abandoned = False  # its fetch was cancelled with the reader that ran it
        self.start = start
        self.end = end
        self.data = bytearray(end - start)
        self.event = trio.Event()
        self.error: DatalakeError | None = None

    def write(self, offset: int, data: bytes | memoryview) -> None:  # RangeSink, on the transport thread
        at = offset - self.start
        self.data[at : at + len(data)] = data

    def close(self) -> None:
        pass


class _Run:
    """One transfer: blocks ``[first, end)`` of a file, all pending when it starts."""

    __slots__ = ("key", "pending", "reader", "slots")

    def __init__(self, slots: dict[tuple[str, int], _Pending], reader: StreamReader, first: int, end: int) -> None:
        self.slots = slots
        self.reader = reader
        self.key = reader.key
        self.pending: dict[int, _Pending] = {}
        for index in range(first, end):
            pending = self.pending[index] = _Pending()
            slots[(self.key.digest, index)] = pending

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
        if self.slots.get(slot) is pending:
            del self.slots[slot]
        pending.event.set()


def _release(block: memoryview | ResidentBytes | None) -> None:
    """Give back the buffer of a block leaving memory (a view of plain bytes has none)."""
    if isinstance(block, ResidentBytes):
        block.release()


class LandingHandoff:
    """Landed blocks, handed from the transport's thread to the trio thread.

    Trio is woken (one ``run_sync_soon``: a write to its wakeup socket and a pass of its loop) only
    for a block a reader waits for, and only if it was not woken already; the other blocks wait in the
    queue and land with that wake-up, or when the trio thread takes the queue itself (:meth:`flush`:
    a reader missing a block, a transfer that returned). A reader about to wait marks its block
    (:meth:`await_block`) under the same lock as the transport thread looks at the mark, and takes the
    queue then, so a block landed just before is never left behind. Thread-safe; the calls must
    never raise."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._lock = threading.Lock()
        self._queue: list[Callable[[], None]] = []
        self._woken = False

    def put(self, call: Callable[[], None], pending: _Pending | None) -> None:
        """From the transport's thread: ``call`` lands the block ``pending`` stands for (None: nobody
        can be waiting for it any more)."""
        with self._lock:
            self._queue.append(call)
            if self._woken or pending is None or not pending.awaited:
                return
            self._woken = True
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self.flush)

    def await_block(self, pending: _Pending) -> None:
        """On the trio thread, before waiting for ``pending``: its landing wakes trio from now on,
        and every block landed before is landed now."""
        with self._lock:
            pending.awaited = True
        self.flush()

    def flush(self) -> None:
        """On the trio thread: land every block queued."""
        with self._lock:
            batch, self._queue, self._woken = self._queue, [], False
        for call in batch:
            call()


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
        self.window_max = max(self.block_size, min(config.prefetch_max, cache.capacity // 4))
        self._failover = Failover(retries=config.http_retries, backoff=retry_backoff)
        self._limiter = trio.CapacityLimiter(max_transfers)
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._pieces: dict[tuple[str, int, int], _Piece] = {}
        self.piece_max = self.block_size // 2 if config.piece_reads else 0
        # Blocks served from memory: those the local disk could not take, and those just written past
        # the page cache (LandedBlock.resident), whose first reads would otherwise go to the disk.
        # Both are sliced without a copy (a read returns a view: see ReadBuffer). Until read to their
        # end they are in ``_in_memory``: room for the windows of every streaming reader together
        # (see window_limit; twice over up to 8 readers, once for 16); then in ``_behind``, the last
        # BEHIND_BLOCKS of them.
        self._in_memory: OrderedDict[tuple[str, int], memoryview | ResidentBytes] = OrderedDict()
        self._in_memory_max = max(4, 2 * self.window_max // self.block_size)
        self._behind: OrderedDict[tuple[str, int], memoryview | ResidentBytes] = OrderedDict()
        # Blocks handed to their readers at arrival whose write to the data file has not ended (file
        # digest -> block index): not committed yet, so found here until they are, whether or not
        # they are still in ``_in_memory``/``_behind``; a block here is never fetched again.
        self._writing: dict[str, dict[int, _Writing]] = {}
        self._streams: set[StreamReader] = set()  # readers whose read-ahead runs (window_limit)
        self._nursery: trio.Nursery | None = None
        self._handoff: LandingHandoff | None = None
        self._hits = 0
        self._misses = 0
        self._requests = 0
        self._bytes = 0
        self._bypassed = 0
        self._verified = 0
        self._transfers = 0
        self._piece_requests = 0
        self._disk_reads = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the transfers until cancelled; then every waiting read fails with TransferError."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._handoff = LandingHandoff(trio.lowlevel.current_trio_token())
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def open(self, info: DIDInfo, locate: Locate) -> StreamReader:
        """A reader for the file ``info``; ``locate`` is awaited for its replicas on the first miss."""
        from datalakefs.staging.stream.reader import StreamReader  # here: the reader module imports this one

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
            disk_reads=self._disk_reads,
        )

    async def clear(self) -> None:
        """Drop every cached block (blocks of running transfers are fetched again for their readers)."""
        self._forget_in_memory()
        await self.cache.clear()

    # ---- reading (for StreamReader) -----------------------------------------------------------

    async def read_block(self, reader: StreamReader, index: int, start: int, length: int) -> ReadBuffer:
        """``length`` bytes at ``start`` of block ``index``: from the cache, else once it arrived."""
        data = self._read_block(reader.key, index, start, length)
        if data is None and self._handoff is not None and (reader.key.digest, index) in self._pending:
            self._handoff.flush()  # it may have landed without waking trio (nobody waited for it)
            data = self._read_block(reader.key, index, start, length)
        if data is not None:
            self._hits += 1
            return data
        self._misses += 1
        return await self._wait_block(reader, index, start, length)

    async def read_small(self, reader: StreamReader, offset: int, end: int) -> ReadBuffer | None:
        """A small random read: from the cache when every block of it is there, else by a piece read;
        None when a block of it is on the way (the caller then waits for the blocks)."""
        key, bs = reader.key, self.block_size
        first, last = offset // bs, (end - 1) // bs
        if any((key.digest, index) in self._pending for index in range(first, last + 1)):
            return None
        data = self._read_cached(key, offset, end)
        if data is not None:
            self._hits += last - first + 1
            return data
        self._misses += last - first + 1
        return await self._read_piece(reader, offset, end)

    async def verify_when_complete(self, key: FileKey) -> None:
        """Check the whole file's adler32 once its last block is cached; raises on a mismatch. When the
        blocks of the file still being written are all it lacks, waits for their writes to end first
        (at most once per file: its last blocks)."""
        cache = self.cache
        if cache.is_verified(key):
            return
        if not cache.is_complete(key):
            writing = self._writing.get(key.digest)
            if not writing or cache.cached_bytes(key) + sum(w.resident.length for w in writing.values()) < key.size:
                return
            await self._until_written(writing)
            if not cache.is_complete(key) or cache.is_verified(key):  # verified by a reader that waited too
                return
        self._verify(key)

    async def _until_written(self, writing: dict[int, _Writing]) -> None:
        """Until each of these blocks' writes ended and their landing was dealt with."""
        assert self._handoff is not None  # blocks are written only while the service runs
        for entry in list(writing.values()):
            self._handoff.await_block(entry.stored)
            await entry.stored.event.wait()

    def window_limit(self, reader: StreamReader) -> int:
        """The read-ahead window ``reader`` may grow to, which counts it as streaming until
        :meth:`stream_ended`: ``window_max`` shared by the streaming readers (by at most
        WINDOW_SHARES_MAX), so that the blocks their windows fetched ahead fit in memory together
        (more would push unread blocks out, to be read back from the disk on this thread) and N
        readers of one file ask for little more than one."""
        self._streams.add(reader)
        bs = self.block_size
        return max(bs, self.window_max // min(len(self._streams), WINDOW_SHARES_MAX) // bs * bs)

    def stream_ended(self, reader: StreamReader) -> None:
        """``reader`` reads ahead no more (it turned random, reached the file's end, or was closed)."""
        self._streams.discard(reader)

    def _read_block(self, key: FileKey, index: int, start: int, length: int) -> ReadBuffer | None:
        slot = (key.digest, index)
        # a block in memory was checked against its page CRCs as it arrived and never left memory:
        # not checked again
        block = self._in_memory.get(slot) if self._in_memory else None
        if block is not None:
            data = block[start : start + length]
            if start + length < len(block):
                self._in_memory.move_to_end(slot)
            else:  # read to its end: what a sequential reader is done with
                del self._in_memory[slot]
                self._behind[slot] = block
                if len(self._behind) > BEHIND_BLOCKS:
                    _release(self._behind.popitem(last=False)[1])
            return data
        block = self._behind.get(slot) if self._behind else None
        if block is not None:
            self._behind.move_to_end(slot)
            return block[start : start + length]
        writing = self._writing.get(key.digest) if self._writing else None
        entry = writing.get(index) if writing else None
        if entry is not None:  # left memory before its write ended (the disk lags the readers)
            return entry.resident[start : start + length]
        stored = self.cache.read(key, index, start, length)
        if stored is not None:
            self._disk_reads += 1
        return stored

    async def wait_stored(self, reader: StreamReader, index: int) -> None:
        """Until block ``index`` is stored (in the cache, or in memory when the disk could not take it),
        without reading it: a warm fills the cache for a later reader."""
        key = reader.key
        if self._stored(key, index):
            self._hits += 1
            return
        self._misses += 1
        await self._arrival(reader, index, lambda: self._stored(key, index) or None)

    def _stored(self, key: FileKey, index: int) -> bool:
        return self.cache.has_block(key, index) or self._held((key.digest, index))

    def _held(self, slot: tuple[str, int]) -> bool:
        writing = self._writing.get(slot[0]) if self._writing else None
        return slot in self._in_memory or slot in self._behind or (writing is not None and slot[1] in writing)

    async def _wait_block(self, reader: StreamReader, index: int, start: int, length: int) -> ReadBuffer:
        return await self._arrival(reader, index, lambda: self._read_block(reader.key, index, start, length))

    async def _arrival(self, reader: StreamReader, index: int, look: Callable[[], _Found | None]) -> _Found:
        """What ``look`` finds once block ``index`` arrived (requested here unless on the way already)."""
        slot = (reader.key.digest, index)
        # A block can vanish between landing and this look only if the cache is tiny or it was
        # corrupted at once; a few rounds tell that apart from a transient race.
        for _ in range(3):
            pending = self._pending.get(slot)
            if pending is None:
                self.request(reader, index, index + 1)
                pending = self._pending.get(slot)
            if pending is not None:
                if self._handoff is not None:
                    self._handoff.await_block(pending)
                await pending.event.wait()
                if pending.error is not None:
                    raise pending.error.anew()
            found = look()
            if found is not None:
                return found
        raise TransferError(
            f"{reader.key.did}: block {index} left the cache as soon as it arrived (cache too small?)"
        )

    def _read_cached(self, key: FileKey, offset: int, end: int) -> ReadBuffer | None:
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

    async def _read_piece(self, reader: StreamReader, offset: int, end: int) -> bytes:
        """Bytes ``[offset, end)`` through a piece read of the pages they cover (single flight).

        The first reader of a piece fetches it in its own task, so a random read costs no task spawn
        and no wake-up of its own (each is a round of the trio scheduler, with an ``epoll_wait``:
        that, not the GET, is most of a piece read's cost on a local link). Readers arriving meanwhile
        wait for it; if the fetching reader is interrupted, one of them fetches the piece again."""
        key = reader.key
        start = offset // PIECE_ALIGN * PIECE_ALIGN
        stop = min(key.size, -(-end // PIECE_ALIGN) * PIECE_ALIGN)
        slot = (key.digest, start, stop)
        while True:
            piece = self._pieces.get(slot)
            if piece is None:
                piece = self._pieces[slot] = _Piece(start, stop)
                await self._piece_transfer(reader, slot, piece)
            else:
                await piece.event.wait()
                if piece.abandoned:
                    continue
            if piece.error is not None:
                raise piece.error.anew()
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
            async with self._transfer_slot():
                await self._failover.run(reader.replicas, attempt, f"piece {piece.start}..{piece.end}")
        except DatalakeError as exc:
            piece.error = exc.anew()
        except trio.Cancelled:
            piece.abandoned = True  # the fetching reader was interrupted: a waiting one fetches it
            raise
        except Exception as exc:  # a bug must fail this piece's reads, not the whole service
            log.exception("%s: piece read failed unexpectedly", reader.key.did)
            piece.error = TransferError(f"{reader.key.did}: internal error in a piece read: {exc!r}")
        finally:
            if self._pieces.get(slot) is piece:
                del self._pieces[slot]
            piece.event.set()

    @contextlib.asynccontextmanager
    async def _transfer_slot(self) -> AsyncIterator[None]:
        """One of the ``max_transfers`` slots; taken without a scheduler round when one is free."""
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._limiter.acquire()
        try:
            yield
        finally:
            self._limiter.release()

    def _verify(self, key: FileKey) -> None:
        result = self.cache.verify(key)
        if result is VerifyResult.VERIFIED:
            self._verified += 1
        elif result is VerifyResult.MISMATCH:
            self._forget_file_in_memory(key.digest)  # else a retry would be served those bytes, unchecked
            raise ChecksumMismatchError(
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
                and not self._held((digest, index))
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
            self._nursery.start_soon(self._transfer, _Run(self._pending, reader, start, stop))

    async def _transfer(self, run: _Run) -> None:
        self._transfers += 1
        first, end = run.remaining() or (0, 0)
        try:
            async with self._transfer_slot():
                await self._failover.run(run.reader.replicas, functools.partial(self._attempt, run),
                                         f"blocks {first}..{end - 1}")
        except DatalakeError as exc:
            run.fail(exc.anew())
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
            on_arrival = None
        else:
            transport = self._transport
            on_block, on_arrival = self._landed_elsewhere(run)
        try:
            await transport.fetch(candidate.url, start, length, key.size,
                                  self.cache.writer(key, first, end, on_block, on_arrival))
        finally:
            if self._handoff is not None:
                self._handoff.flush()  # what is left of the run is known once its landed blocks landed
        return None if run.remaining() is None else "some blocks could not be stored locally"

    def _landed_elsewhere(
        self, run: _Run
    ) -> tuple[Callable[[LandedBlock], None], Callable[[ArrivedBlock], None]]:
        """A block's arrival and landing on the transport's (or the disk's) thread, handed to
        :meth:`_arrived` and :meth:`_landed` on the trio thread."""
        handoff = self._handoff
        assert handoff is not None
        # arrived blocks whose landing has not been handed over: each arrival is handed over before
        # its write is queued, so the disk thread finds its entry (one dict operation: atomic)
        writes: dict[int, _Pending] = {}

        def on_arrival(arrived: ArrivedBlock) -> None:
            stored = writes[arrived.index] = _Pending()
            handoff.put(functools.partial(self._arrived, run, arrived, stored), run.pending.get(arrived.index))

        def on_block(landed: LandedBlock) -> None:
            # run.pending is the trio thread's; one dict lookup is atomic under the GIL, and the entry,
            # if any, stays until this block's landing removes it on the trio thread
            stored = writes.pop(landed.index, None)
            waited = stored if stored is not None else run.pending.get(landed.index)
            handoff.put(functools.partial(self._landed, run, landed, stored), waited)

        return on_block, on_arrival

    def _keep_in_memory(self, slot: tuple[str, int], block: memoryview | ResidentBytes) -> None:
        _release(self._in_memory.pop(slot, None))
        _release(self._behind.pop(slot, None))
        self._in_memory[slot] = block
        while len(self._in_memory) > self._in_memory_max:
            _release(self._in_memory.popitem(last=False)[1])

    def _forget_file_in_memory(self, digest: str) -> None:
        for held in (self._in_memory, self._behind):
            for slot in [slot for slot in held if slot[0] == digest]:
                _release(held.pop(slot))

    def _forget_in_memory(self) -> None:
        for held in (self._in_memory, self._behind):
            for block in held.values():
                _release(block)
            held.clear()

    def _arrived(self, run: _Run, arrived: ArrivedBlock, stored: _Pending) -> None:
        """On the trio thread, for a block handed over before its write ended: its readers get it now;
        it is committed when its landing follows. Must never raise (run_sync_soon callback)."""
        try:
            writing = self._writing.setdefault(run.key.digest, {})
            earlier = writing.get(arrived.index)
            if earlier is not None:  # never while single flight holds; if it did, the latest wins
                earlier.resident.release()
            writing[arrived.index] = _Writing(arrived.resident.share(), stored)
            self._keep_in_memory((run.key.digest, arrived.index), arrived.resident)
            self._bytes += arrived.resident.length
        except Exception:
            log.exception("%s: block %d arrived but could not be recorded", run.key.did, arrived.index)
        finally:
            run.land(arrived.index)

    def _written(self, digest: str, index: int, stored: _Pending) -> None:
        """The block's write ended: it is no longer found among those being written."""
        writing = self._writing.get(digest)
        entry = writing.get(index) if writing is not None else None
        if writing is None or entry is None or entry.stored is not stored:
            return
        del writing[index]
        if not writing:
            del self._writing[digest]
        entry.resident.release()

    def _landed(self, run: _Run, landed: LandedBlock, stored: _Pending | None = None) -> None:
        """On the trio thread, for each block stored (``stored``: that of a block handed over at its
        arrival, set once this is done); must never raise (run_sync_soon callback)."""
        try:
            if stored is not None:
                self._written(run.key.digest, landed.index, stored)
            data = landed.data
            disk_full = landed.errno == errno.ENOSPC
            if data is None and not self.cache.commit(run.key, landed):
                # Its data file was dropped meanwhile (None: the waiters ask again), or the journal
                # could not be written (the bytes are still there: the disk is full).
                data = self.cache.salvage(run.key, landed)
                disk_full = data is not None
            if data is not None:
                self._bypassed += 1
                self._keep_in_memory((run.key.digest, landed.index), memoryview(data))
            if disk_full:
                self.cache.shrink()  # make room for the next blocks
            if stored is None:
                self._bytes += landed.length  # an arrived block was counted when it arrived
        except Exception:
            log.exception("%s: block %d arrived but could not be recorded", run.key.did, landed.index)
        finally:
            run.land(landed.index)
            if stored is not None:
                stored.event.set()
