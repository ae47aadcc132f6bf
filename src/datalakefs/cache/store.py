"""The block cache: an index of block files on local disk, verified reads, LRU eviction.

Design (layout and file format: :mod:`datalakefs.cache.layout`):

* **The block files are the index.** Each block file carries its key, index, length and checksums in
  its header, so there is no separate database that could disagree with the data, and a crash can at
  worst leave a torn block that verification rejects. At start, :meth:`BlockCache.load` rebuilds the
  accounting from a directory scan (names and sizes only; headers are checked lazily on first use),
  drops temp files, blocks of the wrong size, files without valid ``meta`` and leftovers of ``clear``.
  A per-file ``meta`` (JSON, written with temp + rename) records what the directory holds and whether
  the complete file was verified; an SQLite index was not chosen because it would add a commit per
  block on the hot path and a second source of truth.
* **Verified on every read.** :meth:`read` checks the header once per process per block, then the
  CRC32 of every page it returns; a block that fails any check is dropped (counted in
  ``corrupt_blocks``) and the read reports a miss, so the caller fetches it again. Bad bytes are never
  returned.
* **Bounded.** ``used_bytes`` is the sum of block file sizes (headers included, ``meta`` files not).
  When a commit takes it above ``high_watermark * capacity``, least recently used blocks are evicted
  until it is at most ``low_watermark * capacity``. Recency is kept in memory per block; across restarts
  it is approximated by each file's ``meta`` mtime (touched when a reader closes), then block order.
* **Whole-file check.** When a file is complete, :meth:`verify` folds the per-block adler32s into the
  file's and compares it with the catalogue's; a mismatch drops every block of the file.
* **Threads.** Everything here runs on the trio thread except :class:`BlockWriter` (transport thread)
  and the blocking parts of :meth:`load`, :meth:`verify` and :meth:`clear`, which run in worker threads
  on data that is not shared. Per-block work is a few dict operations; eviction unlinks files inline.
* **Private.** Directories are 0700 and files 0600; paths come from key digests, never DID names.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import os
import secrets
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from datalakefs.cache.layout import (
    FORMAT,
    HEADER_SIZE,
    MAX_BLOCK_SIZE,
    META_NAME,
    MIB,
    PAGE_SIZE,
    BlockHeader,
    CorruptBlockError,
    FileKey,
    adler32,
    adler32_combine,
    block_count,
    block_length,
    block_name,
    crc32,
    file_directory,
    make_private_dirs,
    parse_block_name,
    parse_header,
)
from datalakefs.cache.writer import BlockWriter, LandedBlock
from datalakefs.errors import ConfigError
from datalakefs.model import DID

log = logging.getLogger(__name__)

_TRASH_PREFIX = f".{FORMAT}-trash-"


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot of the cache's state and counters (counters start at 0 with the process)."""

    capacity: int
    used_bytes: int
    files: int
    blocks: int
    evictions: int
    evicted_bytes: int
    corrupt_blocks: int
    checksum_mismatches: int


class VerifyResult(enum.Enum):
    VERIFIED = "verified"
    INCOMPLETE = "incomplete"
    MISMATCH = "mismatch"
    UNVERIFIABLE = "no adler32 to check against"


class _Block:
    __slots__ = ("header", "length")

    def __init__(self, length: int, header: BlockHeader | None) -> None:
        self.length = length
        self.header = header


class _File:
    __slots__ = ("blocks", "cached_bytes", "directory", "key", "meta_written", "n_blocks", "verified")

    def __init__(self, key: FileKey, directory: str, block_size: int) -> None:
        self.key = key
        self.directory = directory
        self.n_blocks = block_count(key.size, block_size)
        self.blocks: dict[int, _Block] = {}
        self.cached_bytes = 0
        self.verified = False
        self.meta_written = False


@dataclass(frozen=True, slots=True)
class _ScannedFile:
    key: FileKey
    directory: str
    mtime: float
    verified: bool
    blocks: dict[int, int]  # index -> data length


def _block_bytes(length: int) -> int:
    return HEADER_SIZE + length


class BlockCache:
    """A verified block cache under ``<root>/v1``; see the module docstring for the contract."""

    def __init__(
        self,
        root: Path,
        *,
        capacity: int,
        block_size: int,
        high_watermark: float = 0.95,
        low_watermark: float = 0.90,
        max_open_files: int = 256,
    ) -> None:
        if block_size <= 0 or block_size % MIB or block_size > MAX_BLOCK_SIZE:
            raise ConfigError(f"option block_size: must be a multiple of 1M up to {MAX_BLOCK_SIZE // MIB}M")
        if not 0 < low_watermark < high_watermark <= 1:
            raise ValueError("watermarks must satisfy 0 < low < high <= 1")
        self.block_size = block_size
        self.capacity = capacity
        self._root = str(Path(root) / FORMAT)
        self._high = int(capacity * high_watermark)
        self._low = int(capacity * low_watermark)
        self._max_fds = max_open_files
        self._files: dict[str, _File] = {}
        self._lru: OrderedDict[tuple[str, int], _File] = OrderedDict()
        self._fds: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._used = 0
        self._evictions = 0
        self._evicted_bytes = 0
        self._corrupt = 0
        self._mismatches = 0

    # ---- construction -------------------------------------------------------------------------

    def load(self) -> None:
        """Create the cache directory if needed and rebuild the index from disk (blocking).

        Call once, before any other method.
        """
        self._prepare_root()
        for scanned in sorted(self._scan(), key=lambda s: s.mtime):
            self._adopt(scanned)
        if self._used > self._high:
            self._evict_to(self._low)

    async def open(self) -> None:
        """:meth:`load` in a worker thread; the cache must not be in use yet."""
        await trio.to_thread.run_sync(self.load)

    def _prepare_root(self) -> None:
        parent = os.path.dirname(self._root)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        for name in os.listdir(parent):
            if name.startswith(_TRASH_PREFIX):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        try:
            os.mkdir(self._root, 0o700)
        except FileExistsError:
            st = os.stat(self._root)
            if st.st_uid != os.geteuid():
                raise ConfigError(f"cache directory {self._root} belongs to another user") from None
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(self._root, 0o700)

    def _scan(self) -> Iterable[_ScannedFile]:
        for prefix in os.listdir(self._root):
            prefix_dir = os.path.join(self._root, prefix)
            if len(prefix) != 2 or not os.path.isdir(prefix_dir):
                _remove(prefix_dir)
                continue
            for digest in os.listdir(prefix_dir):
                directory = os.path.join(prefix_dir, digest)
                scanned = self._scan_file(directory, digest)
                if scanned is None:
                    _remove(directory)
                else:
                    yield scanned

    def _scan_file(self, directory: str, digest: str) -> _ScannedFile | None:
        try:
            meta_path = os.path.join(directory, META_NAME)
            with open(meta_path, encoding="utf-8") as fh:
                meta = json.load(fh)
            mtime = os.stat(meta_path).st_mtime
            key = FileKey(DID(meta["scope"], meta["name"]), int(meta["size"]), str(meta["checksum"]))
            if key.digest != digest or meta["block_size"] != self.block_size or meta["format"] != FORMAT:
                return None
            verified = meta["verified"] is True
        except (OSError, ValueError, KeyError, TypeError):
            return None
        n_blocks = block_count(key.size, self.block_size)
        blocks: dict[int, int] = {}
        for entry in os.scandir(directory):
            if entry.name == META_NAME:
                continue
            index = parse_block_name(entry.name)
            if index is not None and index < n_blocks:
                length = block_length(key.size, self.block_size, index)
                if entry.stat().st_size == _block_bytes(length):
                    blocks[index] = length
                    continue
            _remove(entry.path)  # temp files, torn or foreign blocks
        if not blocks:
            return None
        return _ScannedFile(key, directory, mtime, verified and len(blocks) == n_blocks, blocks)

    def _adopt(self, scanned: _ScannedFile) -> None:
        file = _File(scanned.key, scanned.directory, self.block_size)
        file.meta_written = True
        file.verified = scanned.verified
        self._files[scanned.key.digest] = file
        for index in sorted(scanned.blocks):
            length = scanned.blocks[index]
            file.blocks[index] = _Block(length, None)
            file.cached_bytes += length
            self._used += _block_bytes(length)
            self._lru[(scanned.key.digest, index)] = file

    # ---- queries ------------------------------------------------------------------------------

    def directory(self, key: FileKey) -> str:
        return file_directory(self._root, key.digest)

    def has_block(self, key: FileKey, index: int) -> bool:
        file = self._files.get(key.digest)
        return file is not None and index in file.blocks

    def cached_bytes(self, key: FileKey) -> int:
        """Bytes of ``key`` held in the cache (verified or not yet read back)."""
        file = self._files.get(key.digest)
        return file.cached_bytes if file is not None else 0

    def is_complete(self, key: FileKey) -> bool:
        file = self._files.get(key.digest)
        return file is not None and len(file.blocks) == file.n_blocks

    def is_verified(self, key: FileKey) -> bool:
        file = self._files.get(key.digest)
        return file is not None and file.verified

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            capacity=self.capacity,
            used_bytes=self._used,
            files=len(self._files),
            blocks=len(self._lru),
            evictions=self._evictions,
            evicted_bytes=self._evicted_bytes,
            corrupt_blocks=self._corrupt,
            checksum_mismatches=self._mismatches,
        )

    # ---- reading ------------------------------------------------------------------------------

    def read(self, key: FileKey, index: int, start: int, length: int) -> bytes | None:
        """Bytes ``[start, start+length)`` of block ``index``, verified; None when not (or no longer) cached.

        ``start``/``length`` are relative to the block and must lie inside it.
        """
        file = self._files.get(key.digest)
        block = file.blocks.get(index) if file is not None else None
        if file is None or block is None:
            return None
        if start < 0 or length <= 0 or start + length > block.length:
            raise ValueError(f"range {start}+{length} outside block {index} of {block.length} bytes")
        slot = (key.digest, index)
        try:
            fd = self._fd(slot, file)
            header = block.header
            if header is None:
                header = block.header = _load_header(fd, key, self.block_size, index)
            first_page = start // PAGE_SIZE
            span_start = first_page * PAGE_SIZE
            span_end = min(block.length, -(-(start + length) // PAGE_SIZE) * PAGE_SIZE)
            data = os.pread(fd, span_end - span_start, HEADER_SIZE + span_start)
            if len(data) != span_end - span_start:
                raise CorruptBlockError(f"short read: {len(data)} of {span_end - span_start} bytes")
            view = memoryview(data)
            for offset in range(0, len(data), PAGE_SIZE):
                page = first_page + offset // PAGE_SIZE
                if crc32(view[offset : offset + PAGE_SIZE]) != header.page_crc(page):
                    raise CorruptBlockError(f"page {page} checksum mismatch")
        except (CorruptBlockError, OSError) as exc:
            log.warning("cache: dropping block %d of %s: %s", index, key.did, exc)
            self._corrupt += 1
            self._drop_block(file, index)
            return None
        self._lru.move_to_end(slot)
        if start == span_start and length == len(data):
            return data
        return data[start - span_start : start - span_start + length]

    def _fd(self, slot: tuple[str, int], file: _File) -> int:
        fd = self._fds.get(slot)
        if fd is not None:
            self._fds.move_to_end(slot)
            return fd
        fd = os.open(os.path.join(file.directory, block_name(slot[1])), os.O_RDONLY | os.O_CLOEXEC)
        self._fds[slot] = fd
        if len(self._fds) > self._max_fds:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _close_fd(self, slot: tuple[str, int]) -> None:
        fd = self._fds.pop(slot, None)
        if fd is not None:
            os.close(fd)

    # ---- writing ------------------------------------------------------------------------------

    def writer(
        self, key: FileKey, first: int, end: int, on_block: Callable[[LandedBlock], None]
    ) -> BlockWriter:
        """A writer for blocks ``[first, end)`` of ``key``, to be driven on the transport thread.

        ``on_block`` is called on that thread for each finished block; the caller must hand stored
        blocks (``data is None``) to :meth:`commit` on the trio thread.
        """
        return BlockWriter(self._root, self.directory(key), key, self.block_size, first, end, on_block)

    def commit(self, key: FileKey, landed: LandedBlock) -> None:
        """Account for a block file the writer has put in place; may evict other blocks."""
        if landed.data is not None:
            raise ValueError("a block kept in memory is not in the cache")
        file = self._files.get(key.digest)
        if file is None:
            file = self._files[key.digest] = _File(key, self.directory(key), self.block_size)
        if not file.meta_written:
            self._write_meta(file)
        slot = (key.digest, landed.index)
        old = file.blocks.get(landed.index)
        if old is not None:  # refetched: the rename replaced the file, forget the old inode
            self._close_fd(slot)
            file.cached_bytes -= old.length
            self._used -= _block_bytes(old.length)
            if file.verified:
                self._set_verified(file, False)
        file.blocks[landed.index] = _Block(landed.length, landed.header)
        file.cached_bytes += landed.length
        self._used += _block_bytes(landed.length)
        self._lru[slot] = file
        self._lru.move_to_end(slot)
        if self._used > self._high:
            self._evict_to(self._low, keep=slot)

    def shrink(self, fraction: float = 0.1) -> int:
        """Evict least recently used blocks worth ``fraction`` of the used bytes (the disk is full)."""
        before = self._used
        self._evict_to(int(self._used * (1 - fraction)))
        return before - self._used

    def touch(self, key: FileKey) -> None:
        """Record that ``key`` was used, for the recency order after a restart."""
        file = self._files.get(key.digest)
        if file is not None and file.meta_written:
            with contextlib.suppress(OSError):
                os.utime(os.path.join(file.directory, META_NAME))

    def _evict_to(self, target: int, keep: tuple[str, int] | None = None) -> None:
        while self._used > target and self._lru:
            slot, file = next(iter(self._lru.items()))
            if slot == keep:
                if len(self._lru) == 1:
                    return
                self._lru.move_to_end(slot)
                continue
            length = file.blocks[slot[1]].length
            self._drop_block(file, slot[1])
            self._evictions += 1
            self._evicted_bytes += _block_bytes(length)

    def _drop_block(self, file: _File, index: int) -> None:
        slot = (file.key.digest, index)
        if file.verified:
            self._set_verified(file, False)  # before the block goes, so a crash never overstates
        block = file.blocks.pop(index)
        del self._lru[slot]
        self._close_fd(slot)
        _remove(os.path.join(file.directory, block_name(index)))
        file.cached_bytes -= block.length
        self._used -= _block_bytes(block.length)
        if not file.blocks:
            del self._files[file.key.digest]
            _remove(os.path.join(file.directory, META_NAME))
            # A transfer may be writing a temp file there; load() cleans up later.
            with contextlib.suppress(OSError):
                os.rmdir(file.directory)

    def _drop_file(self, file: _File) -> None:
        for index in list(file.blocks):
            self._drop_block(file, index)

    def _set_verified(self, file: _File, verified: bool) -> None:
        file.verified = verified
        self._write_meta(file)

    def _write_meta(self, file: _File) -> None:
        key = file.key
        meta = {
            "format": FORMAT,
            "scope": key.did.scope,
            "name": key.did.name,
            "size": key.size,
            "checksum": key.checksum,
            "block_size": self.block_size,
            "verified": file.verified,
        }
        tmp = os.path.join(file.directory, f".meta.{secrets.token_hex(6)}.tmp")
        try:
            make_private_dirs(self._root, file.directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, json.dumps(meta).encode("utf-8", "surrogateescape"))
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(file.directory, META_NAME))
            file.meta_written = True
        except OSError as exc:
            _remove(tmp)
            # Without meta the blocks are still served now; load() discards the directory later.
            log.warning("cache: cannot write the index of %s: %s", key.did, exc)

    # ---- whole-file verification --------------------------------------------------------------

    async def verify(self, key: FileKey) -> VerifyResult:
        """Check a complete file against the catalogue's adler32; on mismatch drop all its blocks."""
        file = self._files.get(key.digest)
        if file is None or len(file.blocks) < file.n_blocks:
            return VerifyResult.INCOMPLETE
        if file.verified:
            return VerifyResult.VERIFIED
        expected = key.adler32
        if expected is None:
            return VerifyResult.UNVERIFIABLE
        unread = {index: block for index, block in file.blocks.items() if block.header is None}
        if unread:
            headers = await trio.to_thread.run_sync(
                _read_headers, file.directory, key, self.block_size, sorted(unread)
            )
            for index, header in headers.items():
                block = unread[index]
                if file.blocks.get(index) is not block or block.header is not None:
                    continue  # replaced or dropped while we were reading
                if header is None:
                    self._corrupt += 1
                    self._drop_block(file, index)
                else:
                    block.header = header
            if self._files.get(key.digest) is not file or len(file.blocks) < file.n_blocks:
                return VerifyResult.INCOMPLETE
            if file.verified:
                return VerifyResult.VERIFIED
        total = adler32(b"")
        for index in range(file.n_blocks):
            header = file.blocks[index].header
            assert header is not None  # every block's header was loaded above, on this thread
            total = adler32_combine(total, header.adler32, header.length)
        if total == expected:
            self._set_verified(file, True)
            return VerifyResult.VERIFIED
        log.error(
            "cache: %s: adler32 of the received bytes is %08x, the catalogue says %08x; dropping it",
            key.did,
            total,
            expected,
        )
        self._mismatches += 1
        self._drop_file(file)
        return VerifyResult.MISMATCH

    # ---- clearing -----------------------------------------------------------------------------

    async def clear(self) -> None:
        """Drop every block. Transfers still running land their blocks in the emptied cache."""
        self.close()
        self._files.clear()
        self._lru.clear()
        self._used = 0
        trash = os.path.join(os.path.dirname(self._root), _TRASH_PREFIX + secrets.token_hex(6))
        os.rename(self._root, trash)
        os.mkdir(self._root, 0o700)
        await trio.to_thread.run_sync(functools.partial(shutil.rmtree, trash, ignore_errors=True))

    def close(self) -> None:
        """Close the file descriptors kept for reading."""
        while self._fds:
            os.close(self._fds.popitem()[1])


def _load_header(fd: int, key: FileKey, block_size: int, index: int) -> BlockHeader:
    header = parse_header(os.pread(fd, HEADER_SIZE, 0), key, block_size, index)
    size = os.fstat(fd).st_size
    if size != _block_bytes(header.length):
        raise CorruptBlockError(f"block file has {size} bytes, expected {_block_bytes(header.length)}")
    return header


def _read_headers(
    directory: str, key: FileKey, block_size: int, indices: list[int]
) -> dict[int, BlockHeader | None]:
    """Headers of some blocks (None for a missing or corrupt one); runs in a worker thread."""
    headers: dict[int, BlockHeader | None] = {}
    for index in indices:
        try:
            fd = os.open(os.path.join(directory, block_name(index)), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            headers[index] = None
            continue
        try:
            headers[index] = _load_header(fd, key, block_size, index)
        except (CorruptBlockError, OSError):
            headers[index] = None
        finally:
            os.close(fd)
    return headers


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass
