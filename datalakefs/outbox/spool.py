"""Spool files: the local copies of outbox files, written by the kernel's WRITE requests.

A spool file is a plain file in the spool directory, named by a random token (the DID name lives in
the journal). Writes are ``pwrite`` on the trio thread, like cache hits are served with ``pread``:
local disk, no network. While a file is written strictly sequentially its adler32 is kept running
(zlib-ng: ~30 µs per MiB), so a sequentially written file needs no second pass before its upload;
any other write (a hole, an overwrite, a truncate) drops the running checksum and the uploader
computes it from the spool file in a worker thread.

``sync()`` fsyncs the file, :func:`sync_directory` its name; the caller then commits the intent to
the journal. ``ENOSPC`` (a full
disk, or less than ``reserve`` bytes left) is raised as :class:`SpoolFullError` before any byte is
written, so a writer never believes bytes were stored that were not.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

from zlib_ng import zlib_ng

from datalakefs.errors import SpoolFullError

_READ_CHUNK = 4 << 20


def adler32_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


def file_adler32(path: Path) -> tuple[int, str]:
    """Size and adler32 of a file, read in large chunks (blocking: worker threads)."""
    value = 1
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(_READ_CHUNK):
            value = zlib_ng.adler32(chunk, value)
            size += len(chunk)
    return size, adler32_hex(value)


def sync_directory(directory: Path) -> None:
    """fsync a directory: the names created in it survive a crash (blocking: worker threads)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolFile:
    """One spool file and its running checksum. Used from the trio thread only."""

    def __init__(self, path: Path, reserve: int) -> None:
        self.path = path
        self._reserve = reserve
        self._fd: int | None = None
        #: its directory entry survives a crash (set by whoever ran :func:`sync_directory` after it)
        self.entry_durable = path.exists()
        self.size = path.stat().st_size if path.exists() else 0
        # the running adler32 covers bytes [0, _hashed); valid only while writes were sequential
        self._adler = 1
        self._hashed = 0
        self._sequential = self.size == 0

    @classmethod
    def create(cls, directory: Path, reserve: int) -> SpoolFile:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{secrets.token_hex(12)}.spool"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        spool = cls(path, reserve)
        spool._fd = fd
        spool.entry_durable = False
        return spool

    @property
    def name(self) -> str:
        return self.path.name

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
            self._fd = os.open(self.path, os.O_RDWR)
        return self._fd

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

    The trio thread reports each sequential write (:meth:`grown`), then either the end (:meth:`end`,
    once the file is committed and closed) or :meth:`abandon`. Iterating, in a worker thread, yields
    the file's bytes in order as they arrive and stops at the end; after ``abandon`` it raises
    :class:`StreamAbandonedError`. The uploader checks what was sent against the committed size and
    adler32, so a rewrite it raced with is caught there too.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._ready = threading.Condition()
        self._size = 0
        self._ended = False
        self._abandoned = False

    def grown(self, size: int) -> None:
        with self._ready:
            self._size = size
            self._ready.notify()

    def end(self, size: int) -> None:
        with self._ready:
            self._size, self._ended = size, True
            self._ready.notify()

    def abandon(self) -> None:
        with self._ready:
            self._abandoned = True
            self._ready.notify()

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        with open(self._path, "rb", buffering=0) as fh:
            while True:
                with self._ready:
                    while not (self._abandoned or self._ended or self._size > sent):
                        self._ready.wait()
                    if self._abandoned:
                        raise StreamAbandonedError(f"{self._path.name} is no longer written sequentially")
                    available, ended = self._size - sent, self._ended
                if available <= 0 and ended:
                    return
                chunk = os.pread(fh.fileno(), min(available, _READ_CHUNK), sent)
                if not chunk:
                    raise StreamAbandonedError(f"{self._path.name} is shorter than its writes said")
                sent += len(chunk)
                yield chunk
