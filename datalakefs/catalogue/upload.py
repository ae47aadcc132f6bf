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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from datalakefs.errors import DatalakeError, TransferError


class UploadConflictError(DatalakeError):
    """The DID already exists with different content: an upload never overwrites."""

    errno = errno.EEXIST


class SpoolChangedError(TransferError):
    """The bytes sent differ from the journal's size or adler32 (the spool file was rewritten after
    its commit, before a crash): the checksum must be computed again from the file."""


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


#: Called with the name of each step as it completes ("stored", "registered", "attached"); the crash
#: tests kill the daemon there.
StepHook = Callable[[str], None]


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

    def register(self, registrations: Sequence[Registration], step: StepHook) -> Sequence[Exception | None]:
        """Per registration: None once its replica is AVAILABLE, attached and ruled, else its error."""
        ...
