"""What the outbox needs from the lake to upload a file, in datalakefs' own types.

An upload is three steps, and the outbox runs them in this order for each file: :meth:`Uploader.locate`
(is the DID already there, and where do its bytes go), :meth:`Uploader.store` (the bytes, verified),
:meth:`Uploader.register` (replica, dataset attachment, rules). ``locate`` and ``register`` take many
files at once: the outbox batches the files that reach the same step together, so that a thousand
small files cost a few catalogue round trips per batch, not several per file.

Implementations block (HTTP and catalogue calls): the outbox calls them from worker threads. Every
step must be idempotent: the outbox runs them all again after a crash at any instant, and they must
then neither register a second copy nor overwrite a different file. Errors: a DID that exists with
other content is an :class:`UploadConflictError`; a name the catalogue's schema refuses an
``InvalidNameError``; everything else (server, storage, credentials, quota) is worth a retry. The
batch steps answer each file's error in its place, so one bad file never fails its neighbours.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from datalakefs.errors import DatalakeError, TransferError


class UploadConflictError(DatalakeError):
    """The DID already exists with different content: an upload never overwrites."""

    errno = errno.EEXIST


class SpoolChangedError(TransferError):
    """The bytes sent differ from the journal's size or adler32: the spool file is not what was
    committed, and is never uploaded as it is."""


@dataclass(frozen=True, slots=True)
class UploadJob:
    """Upload the bytes of ``path`` as file ``scope:name`` and attach it to ``scope:dataset``."""

    scope: str
    dataset: str
    name: str
    path: Path
    size: int
    adler32: str


@dataclass(frozen=True, slots=True)
class Registration:
    """Register ``job`` in the catalogue; ``stored`` when this attempt stored its bytes (its replica
    is new), False when :meth:`Uploader.locate` found the DID already registered."""

    job: UploadJob
    stored: bool


#: ``DATALAKEFS_TEST_KILL_AT=<transition>[:<n>]`` makes the daemon SIGKILL itself at the n-th time
#: (default the first) it reaches that transition; with ``DATALAKEFS_TEST_KILL_MARK=<file>`` it first
#: writes the transition's name there, so that a crash test knows where the daemon died.
KILL_AT_ENV = "DATALAKEFS_TEST_KILL_AT"
KILL_MARK_ENV = "DATALAKEFS_TEST_KILL_MARK"


class TransitionHooks:
    """The points of the outbox where a crash test may kill the daemon: each journal transition and
    upload step calls :meth:`reached` right after it completed. These hooks do nothing."""

    def reached(self, transition: str) -> None:
        """``transition`` just completed (any thread)."""


class KillAtTransition(TransitionHooks):
    """SIGKILL this process at the ``occurrence``-th time it reaches ``transition``."""

    def __init__(self, transition: str, occurrence: int = 1, mark: Path | None = None) -> None:
        self._transition = transition
        self._left = occurrence
        self._mark = mark
        self._lock = threading.Lock()

    def reached(self, transition: str) -> None:
        if transition != self._transition:
            return
        with self._lock:
            self._left -= 1
            if self._left:
                return
            if self._mark is not None:
                self._mark.write_text(transition)
            os.kill(os.getpid(), signal.SIGKILL)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> TransitionHooks:
        """The hooks :data:`KILL_AT_ENV` asks for, or hooks that do nothing."""
        wanted = environ.get(KILL_AT_ENV)
        if not wanted:
            return TransitionHooks()
        transition, _, occurrence = wanted.partition(":")
        mark = environ.get(KILL_MARK_ENV)
        return cls(transition, int(occurrence or 1), Path(mark) if mark else None)


class ObjectStore(Protocol):
    """How an uploader moves bytes: the storage transport (``transport/storage.py``), blocking, from
    worker threads, with the mount's credentials, CA policy and deadlines."""

    def put(self, url: str, body: Callable[[], Iterable[bytes]] | Iterable[bytes], size: int | None) -> None:
        """Store ``body`` (``size`` bytes, or chunked when None) at ``url``; an object already there is
        a ``StorageConflictError``, never overwritten. A callable ``body`` yields the bytes from the
        start each time it is called (a request refused for its credentials is sent again)."""
        ...

    def head(self, url: str) -> tuple[int, str | None] | None:
        """(size, adler32 or None when the server sends no ``Digest``) of the object at ``url``, or None
        when there is none."""
        ...

    def delete(self, url: str) -> None:
        """Remove the object at ``url`` (none there is fine)."""
        ...


class Uploader(Protocol):
    def check_name(self, name: str) -> None:
        """Raise ``InvalidNameError`` unless the catalogue accepts ``name`` as a DID name (no I/O)."""
        ...

    def locate(self, jobs: Sequence[UploadJob]) -> Sequence[str | Exception | None]:
        """Per job: the URL to store its bytes at; None when its DID is already registered with the
        same content (nothing to store); or its error (:class:`UploadConflictError` ...)."""
        ...

    def store(self, job: UploadJob, url: str) -> None:
        """Send the bytes of ``job`` to ``url`` and verify what arrived (size, adler32)."""
        ...

    def store_stream(self, url: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        """Send ``chunks`` to ``url`` as they come (the file is still being written; its size is not
        known yet), verify the size that arrived, and return (bytes sent, their adler32) for the
        caller to compare with the file's committed size and checksum. An exception raised by
        ``chunks`` aborts the transfer and is raised here."""
        ...

    def register(self, registrations: Sequence[Registration]) -> Sequence[Exception | None]:
        """Per registration: None once its replica is AVAILABLE, attached and ruled, else its error.
        It reaches (:class:`TransitionHooks`) ``upload-registered`` and ``upload-attached``."""
        ...
