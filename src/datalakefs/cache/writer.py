"""Turns the body of one range transfer into block files, on the transport's (asyncio) thread.

A :class:`BlockWriter` covers blocks ``[first, end)`` of one file, i.e. the file bytes from
``first*block_size`` to ``min(size, end*block_size)``; it receives them in order through ``write`` (the
transport's :class:`~datalakefs.transport.http.RangeSink` protocol, matched structurally: this package
does not import the transport). For each block it:

* writes the bytes with ``os.pwrite`` into a new temp file (``O_EXCL``, 0600) after a reserved header,
  computing a CRC32 per page and the block's adler32 as the bytes pass (no second pass over the data);
* when the block is complete, writes the header and renames the temp file to the block's name (so a
  block name never shows a partly written block), then calls ``on_block`` with a :class:`LandedBlock`.

No fsync: the cache is not a store of record. A crash may leave a renamed block whose data never reached
the disk; its header or page checksums then fail and the block is dropped and fetched again.

If the local disk fails (``ENOSPC``, ``EIO``, the cache cleared under us), the block being written is
read back into memory and it and the rest of the transfer are delivered in memory
(``LandedBlock.data``), so the readers waiting for them still get their bytes; a block whose prefix can
not be read back is lost and is not delivered (the caller sees it missing and fetches it again).
``close`` removes the temp file of an unfinished block. A writer is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from datalakefs.cache.layout import (
    HEADER_SIZE,
    PAGE_SIZE,
    BlockHeader,
    FileKey,
    adler32,
    block_length,
    block_name,
    crc32,
    make_private_dirs,
    pack_header,
    pwrite_all,
)

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC  # read back if the disk fails


@dataclass(frozen=True, slots=True)
class LandedBlock:
    """A block that arrived: stored as a block file, or (``data`` set) kept in memory only."""

    header: BlockHeader
    data: bytes | None = None
    errno: int = 0  # the local error that kept it out of the cache, when ``data`` is set

    @property
    def index(self) -> int:
        return self.header.index

    @property
    def length(self) -> int:
        return self.header.length


class _OpenBlock:
    __slots__ = ("adler", "crc", "crcs", "fd", "filled", "index", "length", "lost", "mem", "tmp")

    def __init__(self, index: int, length: int) -> None:
        self.index = index
        self.length = length
        self.filled = 0
        self.adler = adler32(b"")
        self.crc = 0
        self.crcs = array("I")
        self.fd = -1
        self.tmp = ""
        self.mem: bytearray | None = None
        self.lost = False


class BlockWriter:
    """Writes blocks ``[first, end)`` of ``key`` into ``directory``; see the module docstring."""

    def __init__(
        self,
        root: str,
        directory: str,
        key: FileKey,
        block_size: int,
        first: int,
        end: int,
        on_block: Callable[[LandedBlock], None],
    ) -> None:
        self._root = root
        self._dir = directory
        self._key = key
        self._block_size = block_size
        self._next_index = first
        self._pos = first * block_size
        self._end = min(key.size, end * block_size)
        self._on_block = on_block
        self._block: _OpenBlock | None = None
        self._local_error = 0  # once the disk failed, the rest of the transfer stays in memory

    @property
    def position(self) -> int:
        """The file offset the next ``write`` must start at."""
        return self._pos

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
        if block is not None and block.fd >= 0:
            os.close(block.fd)
            _unlink_quietly(block.tmp)

    def _begin(self) -> _OpenBlock:
        index = self._next_index
        self._next_index += 1
        block = _OpenBlock(index, block_length(self._key.size, self._block_size, index))
        self._block = block
        if self._local_error:
            block.mem = bytearray()
            return block
        block.tmp = os.path.join(self._dir, f".{index:010d}.{secrets.token_hex(6)}.tmp")
        try:
            try:
                block.fd = os.open(block.tmp, _OPEN_FLAGS, 0o600)
            except FileNotFoundError:
                make_private_dirs(self._root, self._dir)
                block.fd = os.open(block.tmp, _OPEN_FLAGS, 0o600)
        except OSError as exc:
            self._local_error = exc.errno or -1
            block.mem = bytearray()
        return block

    def _add(self, block: _OpenBlock, piece: memoryview) -> None:
        block.adler = adler32(piece, block.adler)
        start = block.filled
        pos = 0
        while pos < len(piece):
            page_end = (start + pos) // PAGE_SIZE * PAGE_SIZE + PAGE_SIZE
            segment = piece[pos : pos + page_end - start - pos]
            block.crc = crc32(segment, block.crc)
            pos += len(segment)
            if start + pos == page_end or start + pos == block.length:
                block.crcs.append(block.crc)
                block.crc = 0
        if block.mem is not None:
            block.mem += piece
        elif not block.lost:
            try:
                pwrite_all(block.fd, piece, HEADER_SIZE + start)
            except OSError as exc:
                self._to_memory(block, exc)
                if block.mem is not None:
                    block.mem += piece
        block.filled += len(piece)

    def _to_memory(self, block: _OpenBlock, exc: OSError) -> None:
        """The disk failed mid-block: keep what was written, in memory, and stop using the disk."""
        self._local_error = exc.errno or -1
        try:
            prefix = os.pread(block.fd, block.filled, HEADER_SIZE)
        except OSError:
            prefix = b""
        if len(prefix) == block.filled:
            block.mem = bytearray(prefix)
        else:
            block.lost = True
        os.close(block.fd)
        block.fd = -1
        _unlink_quietly(block.tmp)

    def _finish(self, block: _OpenBlock) -> None:
        self._block = None
        if sys.byteorder == "big":
            block.crcs.byteswap()  # the header stores them little-endian
        header = BlockHeader(block.index, block.length, block.adler, block.crcs.tobytes())
        if block.fd >= 0:
            try:
                pwrite_all(block.fd, pack_header(self._key, self._block_size, header), 0)
                os.rename(block.tmp, os.path.join(self._dir, block_name(block.index)))
            except OSError as exc:
                self._to_memory(block, exc)
            else:
                os.close(block.fd)
                self._on_block(LandedBlock(header))
                return
        if block.mem is not None:
            self._on_block(LandedBlock(header, bytes(block.mem), self._local_error))


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
