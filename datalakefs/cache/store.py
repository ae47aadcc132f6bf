"""The block cache: cached blocks of files on local disk, verified reads, LRU eviction.

Design (format: :mod:`datalakefs.cache.layout`):

* **The journal is the index.** Each file's ``.index`` journal records which blocks its sparse ``.data``
  file holds, with their checksums. Nothing else has to agree with it, and a crash can at worst leave a
  torn last record (ignored) or a journaled block whose data is missing (caught by its checksums). At
  start, :meth:`BlockCache.load` replays every journal, drops what is damaged, foreign or past the end
  of a truncated data file, rewrites journals that had damage, and removes anything else it finds.
  A file of one block has no ``.index``: its journal is written whole behind its bytes in the data
  file, and kept at load only when whole (one file created per small file, not two).
  SQLite was not chosen: it would add a commit per block on the hot path and a second source of truth.
* **Verified on every read.** :meth:`read` checks the CRC32 of every page it returns against the
  block's record. A block that fails is dropped (counted in ``corrupt_blocks``) and the read reports a
  miss, so the caller fetches it again: bad bytes are never returned.
* **Bounded.** ``used_bytes`` is the sum of the cached blocks' lengths (journals are not counted). When
  a commit takes it above ``high_watermark * capacity``, least recently used blocks are evicted (their
  space given back with ``FALLOC_FL_PUNCH_HOLE``; whole files where the file system cannot punch holes)
  until it is at most ``low_watermark * capacity``. Recency is kept per block in memory; across restarts
  it is approximated by each journal's mtime (touched when a reader closes, at most once per
  :data:`TOUCH_INTERVAL`: a ``utime`` per close is a metadata write per read of a small file, and a
  journal written meanwhile has a fresh mtime anyway), then block order.
* **Whole-file check.** When a file is complete, :meth:`verify` folds the per-block adler32s into the
  file's and compares it with the catalogue's; a mismatch drops every block of the file.
* **Threads.** Everything here runs on the trio thread, except :class:`BlockWriter` (transport thread),
  :meth:`load` (before the cache is shared) and the removal of a cleared cache (a worker thread).
  Per-block work is a few dict operations and one small journal append.
* **Private.** Directories are 0700 and files 0600; paths come from key digests, never DID names.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import secrets
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from datalakefs.cache.layout import (
    DATA_SUFFIX,
    DIRECT_WRITE_FILESYSTEMS,
    EARLIER_FORMATS,
    FORMAT,
    INDEX_SUFFIX,
    MAX_BLOCK_SIZE,
    MIB,
    PAGE_SIZE,
    TAIL_SIZE,
    BlockRecord,
    CorruptBlockError,
    EntryRole,
    FileKey,
    RecordType,
    adler32,
    adler32_combine,
    block_count,
    block_record,
    block_record_size,
    crc32,
    drop_record,
    file_record,
    file_stem,
    filesystem_type,
    is_prefix_name,
    journal_length,
    parse_block_record,
    parse_drop_record,
    parse_entry_name,
    parse_file_record,
    parse_verified_record,
    punch_hole,
    pwrite_all,
    read_records,
    verified_record,
    with_tail,
)
from datalakefs.cache.writer import ArrivedBlock, BlockWriter, LandedBlock
from datalakefs.errors import ConfigError
from datalakefs.model import ReadBuffer

log = logging.getLogger(__name__)

_TRASH_PREFIXES = tuple(f".{name}-trash-" for name in (FORMAT, *EARLIER_FORMATS))
_COMPACT_SLACK = 64 << 10
#: Seconds within which a journal's mtime is recent enough for the recency order after a restart.
TOUCH_INTERVAL = 60.0


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


class _File:
    __slots__ = (
        "blocks",
        "cached_bytes",
        "inode",
        "journal_bytes",
        "key",
        "live_journal_bytes",
        "n_blocks",
        "punched",
        "single",
        "stem",
        "touched",
        "verdict_journaled",
        "verified",
    )

    def __init__(self, key: FileKey, stem: str, block_size: int, inode: int, single: bool = False) -> None:
        self.key = key
        self.stem = stem  # the path of its entries without their suffix
        self.inode = inode
        self.single = single  # one block, its journal behind its bytes in the data file (layout.py)
        self.n_blocks = block_count(key.size, block_size)
        self.blocks: dict[int, BlockRecord] = {}
        self.punched: dict[int, int] = {}  # block index -> the cache's punch count when it was last punched
        self.cached_bytes = 0
        self.verified = False
        self.journal_bytes = 0  # size of the index file on disk (0: not written yet)
        self.live_journal_bytes = 0  # what a compacted journal would need
        self.touched = 0.0  # the journal's mtime as last set by the cache (wall clock)
        self.verdict_journaled = False  # the journal ends with a VERIFIED record verify() has not given yet


class BlockCache:
    """A verified block cache under ``<root>/v3``; see the module docstring for the contract."""

    def __init__(
        self,
        root: Path,
        *,
        capacity: int,
        block_size: int,
        high_watermark: float = 0.95,
        low_watermark: float = 0.90,
        max_open_files: int = 128,
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
        self._max_open = max_open_files
        self._files: dict[str, _File] = {}
        self._lru: OrderedDict[tuple[str, int], _File] = OrderedDict()
        # (digest, _DATA or _JOURNAL) -> fd, each opened when first needed: a file only read needs no
        # journal fd, and a file just cached keeps the one its journal was started with
        self._fds: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._can_punch = True
        self._direct_writes = False  # O_DIRECT for long transfers: only on a local disk's filesystem
        self._used = 0
        self._punches = 0  # holes punched so far: a writer started before one may have lost bytes to it
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
        self._direct_writes = filesystem_type(self._root) in DIRECT_WRITE_FILESYSTEMS
        found = []
        for prefix in os.listdir(self._root):
            prefix_dir = os.path.join(self._root, prefix)
            if not is_prefix_name(prefix) or not _is_real_directory(prefix_dir):
                log.warning("cache: %s is not the cache's; left alone", prefix_dir)
                continue
            roles: dict[str, set[EntryRole]] = {}
            for name in os.listdir(prefix_dir):
                entry = parse_entry_name(prefix, name)
                if entry is None:
                    log.warning("cache: %s is not the cache's; left alone", os.path.join(prefix_dir, name))
                elif entry[1] is EntryRole.TEMPORARY:
                    _remove(os.path.join(prefix_dir, name))  # of an interrupted compaction
                else:
                    roles.setdefault(entry[0], set()).add(entry[1])
            for digest, present in roles.items():
                stem = os.path.join(prefix_dir, digest)
                if len(present) == 2:
                    loaded = self._load_file(stem, digest)
                else:
                    loaded = self._load_single(stem, digest) if EntryRole.DATA in present else None
                if loaded is None:
                    _remove(stem + INDEX_SUFFIX)
                    _remove(stem + DATA_SUFFIX)
                else:
                    found.append(loaded)
        for _, file in sorted(found, key=lambda pair: pair[0]):
            self._files[file.key.digest] = file
            for index in sorted(file.blocks):
                self._lru[(file.key.digest, index)] = file
                self._used += file.blocks[index].length
        if self._used > self._high:
            self._evict_to(self._low)

    async def open(self) -> None:
        """:meth:`load` in a worker thread; the cache must not be in use yet."""
        await trio.to_thread.run_sync(self.load)

    def _prepare_root(self) -> None:
        """The root exists, is a real directory (never followed through a symbolic link: what the cache
        evicts is deleted), ours and private."""
        parent = os.path.dirname(self._root)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        for name in os.listdir(parent):
            path = os.path.join(parent, name)
            if (name.startswith(_TRASH_PREFIXES) or name in EARLIER_FORMATS) and _is_real_directory(path):
                shutil.rmtree(path, ignore_errors=True)
        try:
            os.mkdir(self._root, 0o700)
        except FileExistsError:
            st = os.lstat(self._root)
            if stat.S_ISLNK(st.st_mode):
                raise ConfigError(
                    f"cache directory {self._root} is a symbolic link: the cache deletes what it evicts and "
                    "never follows one; set cache_dir to the real place"
                ) from None
            if not stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"cache directory {self._root} is not a directory") from None
            if st.st_uid != os.geteuid():
                raise ConfigError(f"cache directory {self._root} belongs to another user") from None
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(self._root, 0o700)

    def _load_file(self, stem: str, digest: str) -> tuple[float, _File] | None:
        """Replay one file's journal; None when nothing usable is left."""
        index_path = stem + INDEX_SUFFIX
        try:
            with open(index_path, "rb") as fh:
                raw = fh.read()
            mtime = os.stat(index_path).st_mtime
            data = os.stat(stem + DATA_SUFFIX)
        except OSError:
            return None
        records = read_records(raw)
        first = next(records, None)
        if first is None or first[0] is not RecordType.FILE:
            return None
        try:
            key = parse_file_record(first[1], self.block_size)
        except CorruptBlockError:
            return None
        if key.digest != digest:
            return None
        file = _File(key, stem, self.block_size, data.st_ino)
        file.touched = mtime
        valid_end = first[2]
        blocks = file.blocks
        for kind, payload, end in records:
            try:
                if kind is RecordType.BLOCK:
                    record = parse_block_record(payload, key, self.block_size)
                    file.verified = file.verified and record.index not in blocks
                    blocks[record.index] = record
                elif kind is RecordType.DROP:
                    blocks.pop(parse_drop_record(payload), None)
                    file.verified = False
                elif kind is RecordType.VERIFIED:
                    file.verified = parse_verified_record(payload)
                else:
                    break
            except (CorruptBlockError, ValueError):
                break
            valid_end = end
        for index in [i for i, r in blocks.items() if i * self.block_size + r.length > data.st_size]:
            del blocks[index]  # past the end of a truncated data file
        if not blocks:
            return None
        file.verified = file.verified and len(blocks) == file.n_blocks
        file.cached_bytes = sum(r.length for r in blocks.values())
        file.live_journal_bytes = sum(block_record_size(r) for r in blocks.values())
        file.journal_bytes = len(raw)
        if valid_end < len(raw) or file.journal_bytes > 2 * file.live_journal_bytes + _COMPACT_SLACK:
            self._compact(file)
        return mtime, file

    def _load_single(self, stem: str, digest: str) -> tuple[float, _File] | None:
        """Load a one-block file from its data file alone; None unless its journal is whole (layout.py)."""
        try:
            fd = os.open(stem + DATA_SUFFIX, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            length = journal_length(os.pread(fd, TAIL_SIZE, max(0, st.st_size - TAIL_SIZE)))
            if length is None or length > st.st_size - TAIL_SIZE:
                return None
            raw = os.pread(fd, length, st.st_size - TAIL_SIZE - length)
        except OSError:
            return None
        finally:
            os.close(fd)
        records = list(read_records(raw))
        if [kind for kind, _, _ in records] != [RecordType.FILE, RecordType.BLOCK, RecordType.VERIFIED]:
            return None
        try:
            key = parse_file_record(records[0][1], self.block_size)
            record = parse_block_record(records[1][1], key, self.block_size)
            verified = parse_verified_record(records[2][1])
        except (CorruptBlockError, ValueError):
            return None
        if key.digest != digest or records[-1][2] != len(raw) or st.st_size != key.size + len(raw) + TAIL_SIZE:
            return None
        file = _File(key, stem, self.block_size, st.st_ino, single=True)
        if file.n_blocks != 1:
            return None
        file.blocks[0] = record
        file.verified = verified
        file.cached_bytes = record.length
        file.journal_bytes = file.live_journal_bytes = len(raw)
        file.touched = st.st_mtime
        return st.st_mtime, file

    # ---- queries ------------------------------------------------------------------------------

    def data_path(self, key: FileKey) -> str:
        return file_stem(self._root, key.digest) + DATA_SUFFIX

    def index_path(self, key: FileKey) -> str:
        return file_stem(self._root, key.digest) + INDEX_SUFFIX

    def has_block(self, key: FileKey, index: int) -> bool:
        file = self._files.get(key.digest)
        return file is not None and index in file.blocks

    def cached_bytes(self, key: FileKey) -> int:
        """Bytes of ``key`` held in the cache."""
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

    def read(self, key: FileKey, index: int, start: int, length: int) -> ReadBuffer | None:
        """Bytes ``[start, start+length)`` of block ``index``, verified; None when not (or no longer) cached.

        ``start``/``length`` are relative to the block and must lie inside it.
        """
        file = self._files.get(key.digest)
        record = file.blocks.get(index) if file is not None else None
        if file is None or record is None:
            return None
        if start < 0 or length <= 0 or start + length > record.length:
            raise ValueError(f"range {start}+{length} outside block {index} of {record.length} bytes")
        first_page = start // PAGE_SIZE
        span_start = first_page * PAGE_SIZE
        span_end = min(record.length, -(-(start + length) // PAGE_SIZE) * PAGE_SIZE)
        try:
            data = os.pread(self._fd(file, _DATA), span_end - span_start, index * self.block_size + span_start)
            if len(data) != span_end - span_start:
                raise CorruptBlockError(f"short read: {len(data)} of {span_end - span_start} bytes")
            view = memoryview(data)
            for offset in range(0, len(data), PAGE_SIZE):
                page = first_page + offset // PAGE_SIZE
                if crc32(view[offset : offset + PAGE_SIZE]) != record.page_crc(page):
                    raise CorruptBlockError(f"page {page} checksum mismatch")
        except (CorruptBlockError, OSError) as exc:
            log.warning("cache: dropping block %d of %s: %s", index, key.did, exc)
            self._corrupt += 1
            self._drop_block(file, index)
            if self._files.get(key.digest) is file:
                # What damaged the block may have damaged its journal too, and a load stops at the
                # first bad record: a drop record appended behind it would never be read, and the
                # block would come back. Rewrite the journal instead (rare: only on corruption).
                self._compact(file)
            return None
        self._lru.move_to_end((key.digest, index))
        if start == span_start and length == len(data):
            return data
        return view[start - span_start : start - span_start + length]

    def _fd(self, file: _File, role: int) -> int:
        """``file``'s data (``_DATA``) or journal (``_JOURNAL``, for appending) fd, opened on first use
        and kept in a small LRU."""
        slot = (file.key.digest, role)
        fd = self._fds.get(slot)
        if fd is not None:
            self._fds.move_to_end(slot)
            return fd
        if role == _DATA:
            fd = os.open(file.stem + DATA_SUFFIX, os.O_RDWR | os.O_CLOEXEC)
        else:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(file.stem + INDEX_SUFFIX, flags, 0o600)
        self._keep_fd(slot, fd)
        return fd

    async def page_in(self, keys: Sequence[FileKey]) -> int:
        """Open the data files of those ``keys`` that are whole in the cache, in one worker thread, and ask
        the kernel to read their first block into memory (``POSIX_FADV_WILLNEED``, which returns at
        once); their fds join the kept ones. Returns how many were opened.

        For a reader going through a directory of small cached files (listing-order prefetch): opening
        a data file and reading it from the disk would otherwise happen on the trio thread while the
        reader waits, one file after the other. A file dropped, replaced or cleared meanwhile is left
        alone (its fd is closed)."""
        wanted = []
        for key in keys:
            file = self._files.get(key.digest)
            if file is not None and len(file.blocks) == file.n_blocks and (key.digest, _DATA) not in self._fds:
                wanted.append(file)
        if not wanted:
            return 0
        paths = [(file.stem + DATA_SUFFIX, min(file.key.size, self.block_size)) for file in wanted]
        opened = await trio.to_thread.run_sync(_open_ahead, paths)
        kept = 0
        for file, (fd, inode) in zip(wanted, opened, strict=True):
            slot = (file.key.digest, _DATA)
            if fd < 0:
                continue
            if self._files.get(file.key.digest) is file and inode == file.inode and slot not in self._fds:
                self._keep_fd(slot, fd)
                kept += 1
            else:
                os.close(fd)
        return kept

    def _keep_fd(self, slot: tuple[str, int], fd: int) -> None:
        self._fds[slot] = fd
        if len(self._fds) > 2 * self._max_open:
            os.close(self._fds.popitem(last=False)[1])

    def _close_fds(self, digest: str) -> None:
        for role in (_DATA, _JOURNAL):
            fd = self._fds.pop((digest, role), None)
            if fd is not None:
                os.close(fd)

    # ---- writing ------------------------------------------------------------------------------

    def writer(
        self,
        key: FileKey,
        first: int,
        end: int,
        on_block: Callable[[LandedBlock], None],
        on_arrival: Callable[[ArrivedBlock], None] | None = None,
    ) -> BlockWriter:
        """A writer for blocks ``[first, end)`` of ``key``, to be driven on the transport thread.

        ``on_block`` is called on that thread (or the disk thread) for each finished block; the caller
        must hand stored blocks (``data is None``) to :meth:`commit` on the trio thread. Committing a
        block that is already cached replaces it. ``on_arrival``: a block written past the page cache,
        for its readers, before its write ended (:class:`~datalakefs.cache.writer.ArrivedBlock`).
        """
        return BlockWriter(self._root, self.data_path(key), key, self.block_size, first, end, on_block,
                           on_arrival=on_arrival, direct=self._direct_writes, since=self._punches)

    def commit(self, key: FileKey, landed: LandedBlock) -> bool:
        """Journal a block the writer stored, making it readable; may evict other blocks.

        Returns False, caching nothing, when the block's data file is no longer the one at the file's
        path (the file was dropped or the cache cleared meanwhile) or the journal cannot be written
        (disk full); :meth:`salvage` may still recover its bytes. A data file replaced behind the
        cache's back makes every block it listed count as corrupt and be forgotten.
        """
        if landed.data is not None:
            raise ValueError("a block kept in memory is not in the cache")
        file = self._files.get(key.digest)
        if file is None or landed.inode != file.inode:
            # The data file at the path is the truth: the block must be in it.
            try:
                inode = os.stat(self.data_path(key)).st_ino
            except OSError:
                return False
            if landed.inode != inode:
                return False
            if file is not None:
                log.warning("cache: the data file of %s was replaced behind our back", key.did)
                self._corrupt += len(file.blocks)
                self._discard(file)
            file = _File(key, file_stem(self._root, key.digest), self.block_size, inode,
                         single=block_count(key.size, self.block_size) == 1)
        record = landed.record
        if file.punched.get(record.index, 0) > landed.since and not self._stored_intact(file, record):
            # The block was cached before and evicted while this transfer rewrote it: the hole punched
            # for the old copy may have taken the new bytes (they read back as zeros).
            return False
        try:
            if file.single:
                # its whole-file check is the block's adler32: the verdict goes with it, verify() gives it
                file.verdict_journaled = key.adler32 == record.adler32
                self._journal_single(file, record, file.verdict_journaled)
            elif file.journal_bytes == 0:
                self._start_journal(file, block_record(key, self.block_size, record))
            else:
                self._append(file, block_record(key, self.block_size, record))
        except OSError as exc:
            log.warning("cache: cannot journal block %d of %s: %s", record.index, key.did, exc)
            if key.digest not in self._files:
                self._close_fds(key.digest)  # its files stay for salvage(); load() removes them
            return False
        self._files[key.digest] = file
        slot = (key.digest, record.index)
        old = file.blocks.get(record.index)
        if old is not None:
            file.cached_bytes -= old.length
            file.live_journal_bytes -= block_record_size(old)
            self._used -= old.length
            if file.verified and file.single:
                file.verified = False  # its journal, just written, has the new block's verdict
            elif file.verified:
                self._set_verified(file, False)
        file.blocks[record.index] = record
        file.cached_bytes += record.length
        file.live_journal_bytes += block_record_size(record)
        self._used += record.length
        self._lru[slot] = file
        self._lru.move_to_end(slot)
        if self._used > self._high:
            self._evict_to(self._low, keep=slot)
        return True

    def salvage(self, key: FileKey, landed: LandedBlock) -> bytes | None:
        """The verified bytes of a stored block :meth:`commit` refused, or None; frees their space."""
        try:
            fd = os.open(self.data_path(key), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_ino != landed.inode:
                return None
            data = os.pread(fd, landed.length, landed.index * self.block_size)
            file = self._files.get(key.digest)
            if file is None or landed.index not in file.blocks:
                with contextlib.suppress(OSError):
                    punch_hole(fd, landed.index * self.block_size, landed.length)
        except OSError:
            return None
        finally:
            os.close(fd)
        return data if _pages_intact(data, landed.record) else None

    def _stored_intact(self, file: _File, record: BlockRecord) -> bool:
        """Whether the data file holds ``record``'s block, every page as its checksum says."""
        try:
            data = os.pread(self._fd(file, _DATA), record.length, record.index * self.block_size)
        except OSError:
            return False
        return _pages_intact(data, record)

    def _start_journal(self, file: _File, first: bytes) -> None:
        """Write ``file``'s journal anew: its header and ``first`` record in one write, on the fd the
        next records are appended with."""
        self._close_fds(file.key.digest)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        fd = os.open(file.stem + INDEX_SUFFIX, flags, 0o600)
        content = file_record(file.key, self.block_size) + first
        try:
            _write_all(fd, content)
        except OSError:
            os.close(fd)
            raise
        self._keep_fd((file.key.digest, _JOURNAL), fd)
        file.journal_bytes = len(content)
        file.touched = time.time()

    def _journal_single(self, file: _File, record: BlockRecord, verified: bool) -> None:
        """Write a one-block file's journal, whole, behind its bytes in the data file (whose fd stays
        open: a read of the file follows). The same length every time: it covers the last one."""
        journal = file_record(file.key, self.block_size) + block_record(file.key, self.block_size, record)
        journal += verified_record(verified)
        pwrite_all(self._fd(file, _DATA), with_tail(journal), file.key.size)
        file.journal_bytes = file.live_journal_bytes = len(journal)
        file.touched = time.time()

    def _append(self, file: _File, record: bytes) -> None:
        if file.single:  # never appended to: written anew with the state in memory
            self._journal_single(file, file.blocks[0], file.verified)
            return
        _write_all(self._fd(file, _JOURNAL), record)
        file.journal_bytes += len(record)
        file.verdict_journaled = False
        file.touched = time.time()
        if file.journal_bytes > 2 * file.live_journal_bytes + _COMPACT_SLACK:
            self._compact(file)

    def _compact(self, file: _File) -> None:
        """Rewrite ``file``'s journal with only its live records (temp file + rename)."""
        self._close_fds(file.key.digest)
        parts = [file_record(file.key, self.block_size)]
        parts += [block_record(file.key, self.block_size, file.blocks[i]) for i in sorted(file.blocks)]
        if file.verified:
            parts.append(verified_record(True))
        content = b"".join(parts)
        file.verdict_journaled = False
        tmp = f"{file.stem}{INDEX_SUFFIX}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, content)
            finally:
                os.close(fd)
            os.replace(tmp, file.stem + INDEX_SUFFIX)
        except OSError as exc:
            _remove(tmp)
            log.warning("cache: cannot compact the index of %s: %s", file.key.did, exc)
            return
        file.journal_bytes = len(content)
        file.touched = time.time()

    def shrink(self, fraction: float = 0.1) -> int:
        """Evict least recently used blocks worth ``fraction`` of the used bytes (the disk is full)."""
        before = self._used
        self._evict_to(int(self._used * (1 - fraction)))
        return before - self._used

    def touch(self, key: FileKey) -> None:
        """Record that ``key`` was used, for the recency order after a restart (a journal the cache
        wrote or touched in the last :data:`TOUCH_INTERVAL` is left as it is)."""
        file = self._files.get(key.digest)
        now = time.time()
        if file is not None and now - file.touched >= TOUCH_INTERVAL:
            with contextlib.suppress(OSError):
                os.utime(file.stem + (DATA_SUFFIX if file.single else INDEX_SUFFIX))
            file.touched = now

    def _evict_to(self, target: int, keep: tuple[str, int] | None = None) -> None:
        while self._used > target and self._lru:
            slot, file = next(iter(self._lru.items()))
            if slot == keep:
                if len(self._lru) == 1:
                    return
                self._lru.move_to_end(slot)
                continue
            victims = [slot[1]] if self._can_punch else [i for i in file.blocks if (file.key.digest, i) != keep]
            for index in victims:
                length = file.blocks[index].length
                self._drop_block(file, index)
                self._evictions += 1
                self._evicted_bytes += length

    def _drop_block(self, file: _File, index: int) -> None:
        digest = file.key.digest
        record = file.blocks.pop(index)
        del self._lru[(digest, index)]
        file.cached_bytes -= record.length
        file.live_journal_bytes -= block_record_size(record)
        self._used -= record.length
        if not file.blocks:
            self._forget(file)
            return
        try:
            if file.verified:
                file.verified = False
                self._append(file, verified_record(False))
            self._append(file, drop_record(index))
            self._punches += 1
            file.punched[index] = self._punches
            if self._can_punch and not punch_hole(self._fd(file, _DATA), index * self.block_size, record.length):
                self._can_punch = False
                log.info("cache: the file system cannot punch holes; evicting whole files")
        except OSError as exc:
            # The journal may still list the block, but its data is gone or unreachable: a later
            # read or load finds its checksums wrong and drops it.
            log.warning("cache: cannot record that block %d of %s was dropped: %s", index, file.key.did, exc)

    def _forget(self, file: _File) -> None:
        """Remove a file that has no block left from memory and disk."""
        digest = file.key.digest
        self._close_fds(digest)
        for slot in [(digest, i) for i in file.blocks]:
            self._lru.pop(slot, None)
        if self._files.get(digest) is file:
            del self._files[digest]
        # A transfer may be writing its data file right now; load() removes a data file without journal.
        _remove(file.stem + INDEX_SUFFIX)
        _remove(file.stem + DATA_SUFFIX)

    def _discard(self, file: _File) -> None:
        """Forget ``file`` in memory only (its files on disk are someone else's now)."""
        digest = file.key.digest
        self._close_fds(digest)
        for index in file.blocks:
            del self._lru[(digest, index)]
        self._used -= file.cached_bytes
        del self._files[digest]

    def _drop_file(self, file: _File) -> None:
        self._used -= file.cached_bytes
        self._forget(file)
        file.blocks.clear()
        file.cached_bytes = 0

    def _set_verified(self, file: _File, verified: bool) -> None:
        file.verified = verified
        try:
            self._append(file, verified_record(verified))
        except OSError as exc:
            log.warning("cache: cannot record the verification of %s: %s", file.key.did, exc)

    # ---- whole-file verification --------------------------------------------------------------

    def verify(self, key: FileKey) -> VerifyResult:
        """Check a complete file against the catalogue's adler32; on mismatch drop all its blocks."""
        file = self._files.get(key.digest)
        if file is None or len(file.blocks) < file.n_blocks:
            return VerifyResult.INCOMPLETE
        if file.verified:
            return VerifyResult.VERIFIED
        expected = key.adler32
        if expected is None:
            return VerifyResult.UNVERIFIABLE
        total = adler32(b"")
        for index in range(file.n_blocks):
            record = file.blocks[index]
            total = adler32_combine(total, record.adler32, record.length)
        if total == expected:
            if file.verdict_journaled:
                file.verified = True
            else:
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
        """Drop every block. Blocks of transfers still running are refused by :meth:`commit`."""
        self.close()
        self._files.clear()
        self._lru.clear()
        self._used = 0
        trash = os.path.join(os.path.dirname(self._root), _TRASH_PREFIXES[0] + secrets.token_hex(6))
        os.rename(self._root, trash)
        os.mkdir(self._root, 0o700)
        await trio.to_thread.run_sync(functools.partial(shutil.rmtree, trash, ignore_errors=True))

    def close(self) -> None:
        """Close the file descriptors kept open."""
        while self._fds:
            os.close(self._fds.popitem()[1])


_DATA: Final = 0
_JOURNAL: Final = 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("short write")
        view = view[written:]


def _open_ahead(paths: list[tuple[str, int]]) -> list[tuple[int, int]]:
    """For each (data file, length): its fd and inode, the kernel asked to read ``length`` bytes of it
    ahead; (-1, 0) when it cannot be opened. On a worker thread."""
    opened = []
    for path, length in paths:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            opened.append((-1, 0))
            continue
        try:
            os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
            opened.append((fd, os.fstat(fd).st_ino))
        except OSError:
            os.close(fd)
            opened.append((-1, 0))
    return opened


def _is_real_directory(path: str) -> bool:
    """A directory, not a symbolic link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def _pages_intact(data: bytes, record: BlockRecord) -> bool:
    """Whether ``data`` is ``record``'s whole block: its length and every page's CRC."""
    view = memoryview(data)
    return len(data) == record.length and all(
        crc32(view[o : o + PAGE_SIZE]) == record.page_crc(o // PAGE_SIZE) for o in range(0, len(data), PAGE_SIZE)
    )
