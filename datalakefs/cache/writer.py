"""Turns the body of one range transfer into cached blocks, on the transport's (asyncio) thread.

A :class:`BlockWriter` covers blocks ``[first, end)`` of one file, i.e. the file bytes from
``first*block_size`` to ``min(size, end*block_size)``; it receives them in order through ``write`` (the
transport's :class:`~datalakefs.transport.http.RangeSink` protocol, matched structurally: this package
does not import the transport), or, while it collects blocks in a buffer (below), by lending the rest
of the current block's buffer for the transport to receive the bytes into (``receive_buffer``, then
``received``: :class:`~datalakefs.transport.http.BufferSink`), which saves a copy of every byte. It:

* opens (creating it, 0600, sized to the file) the file's sparse ``.data`` file and writes each byte with
  ``os.pwrite`` at its own offset, computing a CRC32 per page and each block's adler32 as the bytes pass
  (no second pass over the data);
* when a block is complete, calls ``on_block`` with a :class:`LandedBlock`: its record and the identity
  (inode) of the data file it went to. Nothing is visible to readers until the cache's ``commit`` (on
  the trio thread) appends the record to the journal; ``commit`` refuses a block whose data file is no
  longer the cache's (the file was dropped or the cache cleared meanwhile).

A transfer of at least ``DIRECT_MIN`` bytes, when the cache is on a local disk's filesystem
(``direct``), writes its whole blocks past the page cache (``O_DIRECT``, from a reused page-aligned
buffer): a buffered write costs a copy into freshly allocated page-cache pages (2.5 s of system CPU
per GiB measured on the development VM, against 0.06 s direct), and the kernel keeps the bytes the
reader gets through FUSE in the mount's own page cache anyway, so the cache file's pages would be a
second copy. The direct writes are made by one disk thread, so that the transport's thread receives
the next block meanwhile (the blocks of a writer that queued while the disk was busy go in one
``pwritev``); ``close`` waits for them. The disk is kept off the readers' path: as soon as
such a block is complete and checksummed, ``on_arrival`` gets it (an :class:`ArrivedBlock`: the
buffer it was received into, shared with the disk write, with no copy), so its readers need not wait
for the device; ``on_block`` follows once its write ended, and only then may the block be committed
(a block not yet in the data file is never journaled). The buffer goes back to the pool when both
the write and the readers' holder are done with it (:class:`ResidentBytes`). The unaligned tail of a
file's last block is written buffered; a filesystem that refuses ``O_DIRECT`` gets buffered writes.

No fsync: the cache is not a store of record. A crash may leave a journaled block whose data never
reached the disk; its page checksums then fail and the block is dropped and fetched again.

If the local disk fails (``ENOSPC``, ``EIO``), the block being written is read back into memory and it
and the rest of the transfer are delivered in memory (``LandedBlock.data``), so the readers waiting for
them still get their bytes; a block whose prefix cannot be read back is lost and is not delivered (the
caller sees it missing and fetches it again). ``close`` gives back the space of an unfinished block. A
writer is used by one thread at a time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import mmap
import os
import queue
import sys
import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from datalakefs.cache.layout import (
    PAGE_SIZE,
    BlockRecord,
    FileKey,
    adler32,
    block_length,
    crc32,
    make_private_dirs,
    punch_hole,
    pwrite_all,
    pwritev_all,
)

log = logging.getLogger(__name__)

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC  # read back if the disk fails
DIRECT_MIN = 1 << 20  # transfers this long write past the page cache; small files go through it
_DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of the device's logical block size


class _Buffers:
    """Page-aligned block buffers, reused: a fresh mapping costs a page fault and a cleared page per
    page on first use (a third of the transport thread's system time in a cold 1 GiB read).

    A stack: the buffer given back last is taken first, its lines perhaps still in the CPU's cache
    (the FUSE reply just read it), so the socket's copy into it costs less. Up to ``keep`` are kept,
    enough for every block a stream service holds in memory at once; those below the ``hot`` top of
    the stack are offered to the kernel (``MADV_FREE``: it takes their pages back only under memory
    pressure, and a buffer whose pages it took reads as zeros and is faulted in again on reuse)."""

    def __init__(self, keep: int, hot: int = 16) -> None:
        self._keep = keep
        self._hot = hot
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()  # writers run on the transport's thread, or on trio's
        self.mapped = 0  # fresh mappings made

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):
                if len(self._free[i]) == size:
                    return self._free.pop(i)
            self.mapped += 1
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give(self, buffer: mmap.mmap) -> None:
        """Keep ``buffer`` for reuse, or drop it when enough are kept. Dropped, not closed: ``close``
        raises while a view of it is alive (a read's reply, a traceback's frame), and the mapping goes
        with the last reference to it anyway."""
        with self._lock:
            if len(self._free) >= self._keep:
                return
            self._free.append(buffer)
            if len(self._free) > self._hot:
                # under the lock: a buffer taken meanwhile could be half filled when its pages go
                self._free[-self._hot - 1].madvise(mmap.MADV_FREE)


_buffers = _Buffers(keep=256)


class _SharedBuffer:
    __slots__ = ("buffer", "holders")

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer
        self.holders = 1


_holders_lock = threading.Lock()  # a block's holders live on the disk thread and the trio thread


class ResidentBytes:
    """A block's bytes, in the pooled buffer they were received into (no copy). A slice is a
    ``memoryview`` of that buffer, not a copy: once the buffer went back to the pool, a transport
    thread may receive another block into it, so a slice must be used (or copied) before its holder
    could release the block. The buffer may have several holders at once (the disk thread writing it,
    the trio thread serving it to readers), each with its own ``ResidentBytes`` (:meth:`share`) that it
    releases exactly once; the buffer goes back to the pool with the last. A holder (one thread)
    releases its share once it will not slice again; the read path hands a slice to the FUSE reply
    with no ``await`` in between, so no release can come between (see :data:`datalakefs.model.ReadBuffer`)."""

    __slots__ = ("_shared", "length")

    def __init__(self, buffer: mmap.mmap, length: int) -> None:
        self._shared: _SharedBuffer | None = _SharedBuffer(buffer)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, span: slice) -> memoryview:
        shared = self._shared
        if shared is None:
            raise ValueError("the block's buffer was released")
        start, stop, _ = span.indices(self.length)
        return memoryview(shared.buffer)[start:stop]

    def share(self) -> ResidentBytes:
        """Another holder's share of the same bytes."""
        shared = self._shared
        if shared is None:
            raise ValueError("the block's buffer was released")
        with _holders_lock:
            shared.holders += 1
        other = ResidentBytes.__new__(ResidentBytes)
        other._shared, other.length = shared, self.length
        return other

    def release(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        with _holders_lock:
            shared.holders -= 1
            last = shared.holders == 0
        if last:
            _buffers.give(shared.buffer)


class _DiskThread:
    """The one thread that makes every writer's O_DIRECT writes, in order: the transport's thread
    receives the next block while the disk takes the last one (a direct write waits for the device)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="datalakefs-disk", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:  # a job handles its own OSErrors; anything else is a bug, not a reason to stop
                log.exception("cache: a disk write failed unexpectedly")


_disk = _DiskThread()
_DIRECT_IN_FLIGHT = 4  # blocks of one writer handed to the disk thread and not yet written


@dataclass(frozen=True, slots=True)
class ArrivedBlock:
    """A block written past the page cache, as soon as it arrived and was checksummed, before its write
    ended: its bytes (``resident``, whose holder must ``release`` it) for the readers waiting for it.
    It is not in the data file yet: only the :class:`LandedBlock` that follows says whether it got
    there (and only then may it be committed)."""

    index: int
    resident: ResidentBytes


@dataclass(frozen=True, slots=True)
class LandedBlock:
    """A block that arrived and was stored: in the data file ``inode``, or (``data`` set) kept in
    memory only."""

    record: BlockRecord
    inode: int = 0
    data: bytes | None = None
    errno: int = 0  # the local error that kept it out of the cache, when ``data`` is set
    since: int = 0  # the cache's punch count when the transfer began (BlockCache.commit checks it)

    @property
    def index(self) -> int:
        return self.record.index

    @property
    def length(self) -> int:
        return self.record.length


class _OpenBlock:
    __slots__ = ("adler", "crc", "crcs", "filled", "index", "length", "lost", "mem", "offset")

    def __init__(self, index: int, offset: int, length: int) -> None:
        self.index = index
        self.offset = offset
        self.length = length
        self.filled = 0
        self.adler = adler32(b"")
        self.crc = 0
        self.crcs = array("I")
        self.mem: bytearray | None = None
        self.lost = False


class BlockWriter:
    """Writes blocks ``[first, end)`` of ``key`` into the data file ``data_path`` (its directory is made
    under ``root`` if missing); see the module docstring."""

    def __init__(
        self,
        root: str,
        data_path: str,
        key: FileKey,
        block_size: int,
        first: int,
        end: int,
        on_block: Callable[[LandedBlock], None],
        *,
        on_arrival: Callable[[ArrivedBlock], None] | None = None,
        direct: bool = False,
        since: int = 0,
    ) -> None:
        self._root = root
        self._on_arrival = on_arrival
        self._direct = direct  # may write past the page cache (the cache is on a local disk)
        self._since = since
        self._data_path = data_path
        self._key = key
        self._block_size = block_size
        self._next_index = first
        self._pos = first * block_size
        self._end = min(key.size, end * block_size)
        self._on_block = on_block
        self._block: _OpenBlock | None = None
        self._fd = -1
        self._inode = 0
        self._local_error = 0  # once the disk failed, the rest of the transfer stays in memory
        self._direct_fd = -1  # the same file opened O_DIRECT, for a long transfer's whole blocks
        self._buffer: mmap.mmap | None = None  # the block being filled, page-aligned for O_DIRECT
        self._direct_error = 0  # set by the disk thread when a direct write failed: stop writing direct
        self._in_flight = threading.Semaphore(_DIRECT_IN_FLIGHT)
        self._queued: list[tuple[BlockRecord, ResidentBytes]] = []  # for the disk thread, in order
        self._queued_lock = threading.Lock()
        #: done once ``close`` gave everything back, every finished block handed to ``on_block``
        #: (:class:`~datalakefs.transport.http.DrainingSink`, matched structurally)
        self.drained: concurrent.futures.Future[None] = concurrent.futures.Future()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_at(offset, len(data))
        view = memoryview(data)
        done = 0
        while done < len(view):
            block = self._block or self._begin()
            take = min(len(view) - done, block.length - block.filled)
            self._add(block, view[done : done + take])
            done += take
            if block.filled == block.length:
                self._finish(block)
        self._pos += len(view)

    def receive_buffer(self, offset: int) -> memoryview | None:
        """The rest of the current block's page-aligned buffer, for the transport to receive the body
        into (:class:`~datalakefs.transport.http.BufferSink`, matched structurally); None when the block
        is not collected in a buffer (a short transfer, buffered writes, the disk failed)."""
        self._check_at(offset, 0)
        block = self._block or self._begin()
        if self._buffer is None or block.mem is not None:
            return None
        return memoryview(self._buffer)[block.filled : block.length]

    def received(self, offset: int, count: int) -> None:
        """The first ``count`` bytes of the memory :meth:`receive_buffer` lent hold the bytes at
        ``offset``: checksum them where they are."""
        self._check_at(offset, count)
        block = self._block
        if block is None or self._buffer is None or count > block.length - block.filled:
            raise ValueError(f"{count} bytes received at {offset} into no lent buffer")
        with memoryview(self._buffer) as view:
            self._checksum(block, view[block.filled : block.filled + count])
        block.filled += count
        self._pos += count
        if block.filled == block.length:
            self._finish(block)

    def _check_at(self, offset: int, length: int) -> None:
        if offset != self._pos or offset + length > self._end:
            raise ValueError(f"write at {offset}+{length} outside the expected {self._pos}..{self._end}")

    def close(self) -> None:
        """Give back the space of an unfinished block and the file, and set ``drained`` once every
        finished block was handed to ``on_block``: at once, or, while direct writes are queued, on the
        disk thread after them (the transport's thread does not wait for the disk: it receives the
        other transfers meanwhile)."""
        block, self._block = self._block, None
        if self._fd < 0:
            self._set_drained()
            return
        if self._direct_fd >= 0:
            _disk.submit(self._close_files)  # after this writer's last direct write: the thread keeps order
            return
        if block is not None and block.mem is None and block.filled:
            with contextlib.suppress(OSError):
                punch_hole(self._fd, block.offset, block.filled)
        self._close_files()

    def _close_files(self) -> None:
        try:
            self._stop_direct()
            os.close(self._fd)
            self._fd = -1
        finally:
            self._set_drained()  # even if closing failed: the transfer must not wait forever

    def _set_drained(self) -> None:
        if not self.drained.done():
            self.drained.set_result(None)

    def _drain(self) -> None:
        """Wait until the disk thread made every write this writer handed it."""
        if self._direct_fd >= 0:
            done = threading.Event()
            _disk.submit(done.set)  # runs after this writer's last direct write: the thread keeps order
            done.wait()

    def _stop_direct(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self._buffer is not None:
            _buffers.give(self._buffer)
            self._buffer = None

    def _open_data(self) -> None:
        path = self._data_path
        try:
            try:
                fd = os.open(path, _OPEN_FLAGS, 0o600)
            except FileNotFoundError:
                make_private_dirs(self._root, os.path.dirname(path))
                fd = os.open(path, _OPEN_FLAGS, 0o600)
            st = os.fstat(fd)
            # New: sized now, so that truncation shows later; unless this transfer ends at the file's
            # end, when its last write sizes it (a small file's one block: a syscall fewer).
            if st.st_size != self._key.size and self._end != self._key.size:
                os.ftruncate(fd, self._key.size)
        except OSError as exc:
            self._local_error = exc.errno or -1
            return
        self._fd, self._inode = fd, st.st_ino
        if self._direct and self._end - self._pos >= DIRECT_MIN and self._block_size % _DIRECT_ALIGN == 0:
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                return  # this filesystem takes no O_DIRECT: buffered writes
            self._buffer = _buffers.take(self._block_size)

    def _begin(self) -> _OpenBlock:
        index = self._next_index
        self._next_index += 1
        block = _OpenBlock(index, index * self._block_size, block_length(self._key.size, self._block_size, index))
        self._block = block
        if self._fd < 0 and not self._local_error:
            self._open_data()
        if self._local_error:
            block.mem = bytearray()
        return block

    def _add(self, block: _OpenBlock, piece: memoryview) -> None:
        start = block.filled
        self._checksum(block, piece)
        if block.mem is not None:
            block.mem += piece
        elif self._buffer is not None:
            self._buffer[start : start + len(piece)] = piece
        elif not block.lost:
            try:
                pwrite_all(self._fd, piece, block.offset + start)
            except OSError as exc:
                self._to_memory(block, exc)
                if block.mem is not None:
                    block.mem += piece
        block.filled += len(piece)

    @staticmethod
    def _checksum(block: _OpenBlock, piece: memoryview) -> None:
        """Fold ``piece``, the block's next bytes, into its adler32 and page CRCs."""
        block.adler = adler32(piece, block.adler)
        start = block.filled
        pos = 0
        while pos < len(piece):
            page_end = (start + pos) // PAGE_SIZE * PAGE_SIZE + PAGE_SIZE
            segment = piece[pos : page_end - start]
            block.crc = crc32(segment, block.crc)
            pos += len(segment)
            if start + pos == page_end or start + pos == block.length:
                block.crcs.append(block.crc)
                block.crc = 0

    def _to_memory(self, block: _OpenBlock, exc: OSError) -> None:
        """The disk failed mid-block: keep what was written, in memory, and stop using the disk."""
        self._local_error = exc.errno or -1
        try:
            prefix = os.pread(self._fd, block.filled, block.offset)
        except OSError:
            prefix = b""
        if len(prefix) == block.filled:
            block.mem = bytearray(prefix)
        else:
            block.lost = True
        with contextlib.suppress(OSError):
            punch_hole(self._fd, block.offset, block.filled)

    def _finish(self, block: _OpenBlock) -> None:
        self._block = None
        if sys.byteorder == "big":
            block.crcs.byteswap()  # records store them little-endian
        record = BlockRecord(block.index, block.length, block.adler, block.crcs.tobytes())
        if block.mem is None and self._buffer is not None:
            if not self._direct_error:
                written = ResidentBytes(self._buffer, block.length)
                self._buffer = _buffers.take(self._block_size)
                if self._on_arrival is not None:
                    self._on_arrival(ArrivedBlock(block.index, written.share()))
                self._in_flight.acquire()
                with self._queued_lock:
                    self._queued.append((record, written))
                    first = len(self._queued) == 1
                if first:  # else the job queued for the blocks before takes it with them
                    _disk.submit(self._write_queued)
                return
            self._write_without_direct(block)  # the disk thread found direct writes refused or failing
        if block.mem is not None:
            self._on_block(LandedBlock(record, data=bytes(block.mem), errno=self._local_error))
        elif not block.lost:
            self._on_block(LandedBlock(record, inode=self._inode, since=self._since))

    def _write_queued(self) -> None:
        """On the disk thread: the blocks queued since the last such job. Several whole blocks go in
        one ``pwritev`` (one larger I/O, and one wait for the GIL between writes instead of one per
        block); a file's unaligned last block, or a batch the disk refused, block by block."""
        with self._queued_lock:
            batch, self._queued = self._queued, []
        whole = 0
        while whole < len(batch) and batch[whole][0].length % _DIRECT_ALIGN == 0:
            whole += 1
        if whole > 1 and not self._direct_error and self._write_together(batch[:whole]):
            for record, written in batch[:whole]:
                written.release()
                self._hand_over(LandedBlock(record, inode=self._inode, since=self._since))
            batch = batch[whole:]
        for record, written in batch:
            self._write_direct(record, written)

    def _write_together(self, batch: list[tuple[BlockRecord, ResidentBytes]]) -> bool:
        """Write consecutive whole blocks with one O_DIRECT ``pwritev``; False if it failed (each block
        is then written on its own, which tells a refusal from a local error)."""
        views = [written[0 : record.length] for record, written in batch]
        try:
            pwritev_all(self._direct_fd, views, batch[0][0].index * self._block_size)
        except OSError:
            return False
        finally:
            for view in views:
                view.release()
        return True

    def _write_direct(self, record: BlockRecord, written: ResidentBytes) -> None:
        """On the disk thread: the block's whole pages past the page cache, an unaligned tail (the
        file's end) buffered, then ``on_block``. A refusal (EINVAL) writes it buffered; a local error
        hands it over in memory; either stops the writer's direct writes."""
        offset, length = record.index * self._block_size, record.length
        view = written[0:length]
        aligned = length // _DIRECT_ALIGN * _DIRECT_ALIGN
        try:
            try:
                pwrite_all(self._direct_fd, view[:aligned], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_error = errno.EINVAL
                pwrite_all(self._fd, view[:aligned], offset)
            if aligned < length:
                pwrite_all(self._fd, view[aligned:], offset + aligned)
        except OSError as exc:
            self._direct_error = self._local_error = exc.errno or -1
            landed = LandedBlock(record, data=bytes(view), errno=self._local_error)
            with contextlib.suppress(OSError):
                punch_hole(self._fd, offset, length)
        else:
            landed = LandedBlock(record, inode=self._inode, since=self._since)
        finally:
            view.release()
            written.release()
        self._hand_over(landed)

    def _hand_over(self, landed: LandedBlock) -> None:
        self._in_flight.release()
        self._on_block(landed)

    def _write_without_direct(self, block: _OpenBlock) -> None:
        """Write the block collected in the buffer through the page cache (direct writes were refused),
        or keep it in memory (the disk failed), and stop collecting blocks in a buffer."""
        assert self._buffer is not None
        view = memoryview(self._buffer)[: block.length]
        try:
            if self._direct_error == errno.EINVAL:
                pwrite_all(self._fd, view, block.offset)
            else:  # the disk failed (``_local_error`` says how): the rest of the transfer stays in memory
                block.mem = bytearray(view)
        except OSError as exc:
            self._local_error = exc.errno or -1
            block.mem = bytearray(view)
        finally:
            view.release()
        self._drain()
        self._stop_direct()
