"""What the outbox needs from the lake to upload a file, in datalakefs' own types.

Implementations block (HTTP and catalogue calls): the outbox calls them from worker threads.
:meth:`Uploader.upload` must be idempotent: the outbox calls it again after a crash at any instant,
and it must then neither register a second copy nor overwrite a different file. Errors: a DID that
exists with other content raises :class:`UploadConflictError`; a name the catalogue's schema refuses
``InvalidNameError``; everything else (server, storage, credentials, quota) is worth a retry.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
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


#: Called with the name of each step as it completes ("stored", "registered", "attached"); the crash
#: tests kill the daemon there.
StepHook = Callable[[str], None]


class Uploader(Protocol):
    def check_name(self, name: str) -> None:
        """Raise ``InvalidNameError`` unless the catalogue accepts ``name`` as a DID name (no I/O)."""
        ...

    def upload(self, job: UploadJob, step: StepHook) -> bool:
        """Make ``job`` true in the lake; returns False when the file was already there (nothing
        was transferred), True when its bytes were stored by this call."""
        ...
