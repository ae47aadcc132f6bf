"""Turns the body of one range transfer into cached blocks, on the transport's (asyncio) thread.

A :class:`BlockWriter` covers blocks ``[first, end)`` of one file, i.e. the file bytes from
``first*block_size`` to ``min(size, end*block_size)``; it receives them in order through ``write`` (the
transport's :class:`~datalakefs.transport.http.RangeSink` protocol, matched structurally: this package
does not import the transport). It:

* opens (creating it, 0600, sized to the file) the file's sparse ``.data`` file and writes each byte with
  ``os.pwrite`` at its own offset, computing a CRC32 per page and each block's adler32 as the bytes pass
  (no second pass over the data);
* when a block is complete, calls ``on_block`` with a :class:`LandedBlock`: its record and the identity
  (inode) of the data file it went to. Nothing is visible to readers until the cache's ``commit`` (on
  the trio thread) appends the record to the journal; ``commit`` refuses a block whose data file is no
  longer the cache's (the file was dropped or the cache cleared meanwhile).

No fsync: the cache is not a store of record. A crash may leave a journaled block whose data never
reached the disk; its page checksums then fail and the block is dropped and fetched again.

If the local disk fails (``ENOSPC``, ``EIO``), the block being written is read back into memory and it
and the rest of the transfer are delivered in memory (``LandedBlock.data``), so the readers waiting for
them still get their bytes; a block whose prefix cannot be read back is lost and is not delivered (the
caller sees it missing and fetches it again). ``close`` gives back the space of an unfinished block. A
writer is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import os
import sys
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
)

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC  # read back if the disk fails


@dataclass(frozen=True, slots=True)
class LandedBlock:
    """A block that arrived: in the data file ``inode``, or (``data`` set) kept in memory only."""

    record: BlockRecord
    inode: int = 0
    data: bytes | None = None
    errno: int = 0  # the local error that kept it out of the cache, when ``data`` is set

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
    ) -> None:
        self._root = root
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

    def write(self, offset: int, data: bytes) -> None:
        if offset != self._pos or offset + len(data) > self._end:
            raise ValueError(f"write at {offset}+{len(data)} outside the expected {self._pos}..{self._end}")
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

    def close(self) -> None:
        block, self._block = self._block, None
        if self._fd < 0:
            return
        if block is not None and block.mem is None and block.filled:
            with contextlib.suppress(OSError):
                punch_hole(self._fd, block.offset, block.filled)
        os.close(self._fd)
        self._fd = -1

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
        if block.mem is not None:
            block.mem += piece
        elif not block.lost:
            try:
                pwrite_all(self._fd, piece, block.offset + start)
            except OSError as exc:
                self._to_memory(block, exc)
                if block.mem is not None:
                    block.mem += piece
        block.filled += len(piece)

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
        if block.mem is not None:
            self._on_block(LandedBlock(record, data=bytes(block.mem), errno=self._local_error))
        elif not block.lost:
            self._on_block(LandedBlock(record, inode=self._inode))
