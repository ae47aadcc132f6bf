"""Spool files: the local copies of outbox files, written by the kernel's WRITE requests.

A spool file is a plain file in the spool directory, named ``<journal id>-<random token>`` (the
DID name lives in the journal): ``.draft`` while it holds bytes nobody committed, ``.spool`` once a
commit recorded it (:meth:`SpoolFile.publish`, right after the journal transaction). So a ``.draft``
without a journal row was provably never acknowledged, and the journal id tells this outbox's files
from anything else in the directory. Writes are ``pwrite`` on the trio thread, like cache hits are
served with ``pread``: local disk, no network. While a file is written strictly sequentially its adler32 is kept running
(zlib-ng: ~30 µs per MiB), so a sequentially written file needs no second pass before its upload;
any other write (a hole, an overwrite, a truncate) drops the running checksum and the uploader
computes it from the spool file in a worker thread.

The spool's pages leave the page cache once on disk: every ``WRITEBACK_STEP`` bytes a writer adds,
their writeback starts (so the ``fsync`` of ``close()`` has little left to do) and the pages written
back since (``DROP_LAG`` behind) are dropped; an upload drops the pages it read once it sent them. A
big file then cycles through a few megabytes of page cache instead of taking a fresh page for each of
its bytes: on a virtual machine whose free memory goes back to the host (free page reporting), the
first touch of a fresh page costs far more than the copy into it. An upload that falls behind the
writer reads from disk what was dropped.

``sync()`` fsyncs the file, :func:`sync_directory` its name; the caller then commits the intent to
the journal. ``ENOSPC`` (a full
disk, or less than ``reserve`` bytes left) is raised as :class:`SpoolFullError` before any byte is
written, so a writer never believes bytes were stored that were not.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

from zlib_ng import zlib_ng

from datalakefs.errors import SpoolFullError

_READ_CHUNK = 4 << 20
#: a writer starts the writeback of every this many new bytes
WRITEBACK_STEP = 8 << 20
#: a writer drops the pages this far behind the end of the last writeback it started
DROP_LAG = 2 * WRITEBACK_STEP
#: the most bytes of its last writes a GrowingSpool holds for its reader
HANDOFF_LIMIT = 32 << 20
DRAFT = ".draft"
PUBLISHED = ".spool"


def adler32_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


def file_adler32(path: Path, limit: int | None = None) -> tuple[int, str]:
    """Size and adler32 of a file (of its first ``limit`` bytes), read in large chunks (blocking:
    worker threads); a symlink is not followed."""
    value = 1
    size = 0
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb", buffering=0) as fh:
        while chunk := fh.read(_READ_CHUNK if limit is None else min(_READ_CHUNK, limit - size)):
            value = zlib_ng.adler32(chunk, value)
            size += len(chunk)
    return size, adler32_hex(value)


def release_pages(fd: int, start: int, end: int) -> None:
    """Start the writeback of bytes [start, end) of a file and drop those already on disk from the
    page cache (``POSIX_FADV_DONTNEED``: advice, so a failure changes nothing but memory use)."""
    if end > start:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


def sync_directory(directory: Path) -> None:
    """fsync a directory: the names created in it survive a crash (blocking: worker threads)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolFile:
    """One spool file and its running checksum. Used from the trio thread only."""

    def __init__(self, path: Path, reserve: int, size: int = 0) -> None:
        self.path = path
        self._reserve = reserve
        self._fd: int | None = None
        #: its directory entry survives a crash (set by whoever ran :func:`sync_directory` after it)
        self.entry_durable = True
        self.size = size
        # the running adler32 covers bytes [0, _hashed); valid only while writes were sequential
        self._adler = 1
        self._hashed = 0
        self._sequential = size == 0
        # the writeback of bytes [0, _written_back) has been started (those DROP_LAG below are dropped)
        self._written_back = 0

    @classmethod
    def create(cls, directory: Path, owner: str, reserve: int) -> SpoolFile:
        """A new, empty draft of the journal ``owner``."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{owner}-{secrets.token_hex(12)}{DRAFT}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        spool = cls(path, reserve)
        spool._fd = fd
        spool.entry_durable = False
        return spool

    @classmethod
    def copy_of(cls, source: SpoolFile, length: int, owner: str) -> SpoolFile:
        """A new draft holding the first ``length`` bytes of ``source`` (blocking: worker threads;
        ``copy_file_range`` lets the filesystem share the blocks where it can)."""
        spool = cls.create(source.path.parent, owner, source._reserve)
        try:
            spool._check_space(0, length)
            with open(source.path, "rb", buffering=0) as src:
                copied = 0
                while copied < length:
                    step = os.copy_file_range(src.fileno(), spool._handle(), length - copied, copied, copied)
                    if step == 0:
                        break
                    copied += step
        except OSError as exc:
            spool.delete()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool disk full copying {source.path.name}") from exc
            raise
        except BaseException:
            spool.delete()
            raise
        spool.size = copied
        spool._sequential = copied == 0
        return spool

    @property
    def name(self) -> str:
        """The name the journal records: the published one."""
        return self.path.with_suffix(PUBLISHED).name

    @property
    def published(self) -> bool:
        return self.path.suffix == PUBLISHED

    def publish(self) -> None:
        """Rename the draft to its published name (blocking; after its journal commit)."""
        if not self.published:
            target = self.path.with_suffix(PUBLISHED)
            os.rename(self.path, target)
            self.path = target

    def rebase(self, size: int, adler32: str) -> None:
        """The file holds ``size`` bytes with ``adler32`` (computed by a pass over it): appends from
        here on keep a running checksum again."""
        if size == self.size:
            self._adler, self._hashed, self._sequential = int(adler32, 16), size, True

    @property
    def sequential(self) -> bool:
        """Written front to back so far: the running checksum covers the whole file."""
        return self._sequential and self._hashed == self.size

    @property
    def adler32(self) -> str | None:
        """The file's adler32 when the running checksum covers the whole file."""
        return adler32_hex(self._adler) if self.sequential else None

    def _handle(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        return self._fd

    def duplicate_handle(self) -> int:
        """A descriptor of its own for a reader in another thread (the file may be renamed)."""
        return os.dup(self._handle())

    def write(self, offset: int, data: bytes) -> int:
        self._check_space(offset, len(data))
        try:
            written = os.pwrite(self._handle(), data, offset)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool disk full writing {self.path.name}") from exc
            raise
        if self._sequential and offset == self._hashed:
            self._adler = zlib_ng.adler32(data[:written], self._adler)
            self._hashed += written
        else:
            self._sequential = False
        if written:
            self.size = max(self.size, offset + written)
            if self.size - self._written_back >= WRITEBACK_STEP:
                step_end = self.size - self.size % WRITEBACK_STEP
                release_pages(self._handle(), max(0, self._written_back - DROP_LAG), step_end)
                self._written_back = step_end
        return written

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self._handle(), size, offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._handle(), size)
        if size == 0:
            self._adler, self._hashed, self._sequential = 1, 0, True
        elif size != self._hashed:
            self._sequential = False
        self.size = size
        self._written_back = min(self._written_back, size)

    def sync(self) -> None:
        """fsync the file's bytes (blocking: call from a worker thread); ENOSPC/EIO surface here too.
        Its directory entry is durable once :func:`sync_directory` ran after this (the outbox does it
        once per group of commits, and then sets :attr:`entry_durable`)."""
        try:
            os.fsync(self._handle())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool disk full flushing {self.path.name}") from exc
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def delete(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def _check_space(self, offset: int, length: int) -> None:
        growth = offset + length - self.size
        if growth <= 0:
            return
        stats = os.statvfs(self.path.parent)
        if stats.f_bavail * stats.f_frsize - growth < self._reserve:
            raise SpoolFullError(
                f"spool disk {self.path.parent} has less than spool_reserve={self._reserve} bytes free"
            )


class StreamAbandonedError(Exception):
    """The file stopped being written sequentially (or was removed): its early upload is void."""


class GrowingSpool:
    """The bytes of a spool file as they are written, for an upload that starts before ``close()``.

    The trio thread reports each sequential write (:meth:`grown`, with the bytes written), then
    either the end (:meth:`end`, once the file is committed and closed) or :meth:`abandon`.
    Iterating, in a worker thread, yields the file's bytes in order as they arrive and stops at the
    end; after ``abandon`` it raises :class:`StreamAbandonedError`. The bytes of the last writes
    (up to ``HANDOFF_LIMIT``) are handed over as they are, so that a reader keeping up never reads
    them back; what it fell behind on (or what was written before it started) it reads from the
    file. The uploader checks what was sent against the committed size and adler32, so a rewrite it
    raced with is caught there too.
    """

    def __init__(self, spool: SpoolFile) -> None:
        self._name = spool.path.name
        self._fd = spool.duplicate_handle()
        self._ready = threading.Condition()
        self._size = 0
        self._ended = False
        self._abandoned = False
        # the bytes of the last sequential writes, the first at _handoff_start: ready to send
        self._handoff: collections.deque[bytes] = collections.deque()
        self._handoff_start = 0
        self._handoff_bytes = 0

    def grown(self, size: int, data: bytes = b"") -> None:
        """The file holds ``size`` bytes, the last of which are ``data`` (just written)."""
        with self._ready:
            if data:
                offset = size - len(data)
                if self._handoff_start + self._handoff_bytes != offset:  # nothing held, or a gap
                    self._release_handoff(offset)
                self._handoff.append(data)
                self._handoff_bytes += len(data)
                while self._handoff_bytes > HANDOFF_LIMIT:  # the reader fell behind: it reads the file
                    self._forget_handed(len(self._handoff[0]))
            self._size = size
            self._ready.notify()

    def end(self, size: int) -> None:
        with self._ready:
            self._size, self._ended = size, True
            self._ready.notify()

    def abandon(self) -> None:
        with self._ready:
            self._abandoned = True
            self._release_handoff(self._size)
            self._ready.notify()

    def close(self) -> None:
        """Release its descriptor and the bytes it holds (after the transfer thread is done with it)."""
        with self._ready:
            self._release_handoff(self._size)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _release_handoff(self, start: int) -> None:
        self._handoff.clear()
        self._handoff_start, self._handoff_bytes = start, 0

    def _forget_handed(self, length: int) -> None:
        self._handoff.popleft()
        self._handoff_start += length
        self._handoff_bytes -= length

    def __iter__(self) -> Iterator[bytes]:
        """The bytes in order; a chunk's pages leave the page cache when the next one is asked for
        (the transfer sent it by then), as far as they are on disk."""
        sent = 0
        dropped = 0
        while True:
            with self._ready:  # held while reading: close() never pulls the descriptor from under a read
                while not (self._abandoned or self._ended or self._size > sent):
                    self._ready.wait()
                if self._abandoned or self._fd < 0:
                    raise StreamAbandonedError(f"{self._name} is no longer written sequentially")
                available, ended = self._size - sent, self._ended
                release_pages(self._fd, dropped, sent)
                dropped = sent
                if available <= 0 and ended:
                    return
                while self._handoff and self._handoff_start < sent:  # sent from the file already
                    self._forget_handed(len(self._handoff[0]))
                if self._handoff and self._handoff_start == sent:
                    chunk = self._handoff[0]
                    self._forget_handed(len(chunk))
                else:
                    before_handoff = self._handoff_start - sent if self._handoff else available
                    chunk = os.pread(self._fd, min(available, before_handoff, _READ_CHUNK), sent)
            if not chunk:
                raise StreamAbandonedError(f"{self._name} is shorter than its writes said")
            sent += len(chunk)
            yield chunk
