"""The files of the outbox as both halves of the service see them: their bytes, their last committed
version, and where their upload stands.

A file's bytes (``spool``) are what ``read`` and ``stat`` see. Its ``committed`` version is what the
last successful ``close()``/``fsync()`` acknowledged: a spool file, its size and adler32, and its
journal row. The two are one spool file until a change would touch committed bytes; then the change
goes to a copy (a draft), so that the committed bytes stay as they were until the next commit
replaces them. Appending to a committed file (writes and truncates at or past its committed size)
happens in place: a restart cuts such a spool file back to its committed size, so the acknowledged
bytes are never lost and never mixed with newer ones.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from datalakefs.model import DID
from datalakefs.outbox.journal import FileState
from datalakefs.outbox.spool import GrowingSpool, SpoolFile

#: Names starting with this are temporary (rsync's ``.name.XXXXXX``, editors' and writers' scratch
#: files): kept in the outbox like any file, never uploaded under that name; a rename to a valid DID
#: name makes them an upload.
TEMPORARY_PREFIX = "."

_serials = itertools.count(1)


@dataclass(eq=False)
class Committed:
    """The version of a file that the last successful close()/fsync() acknowledged."""

    upload_id: int
    spool: SpoolFile
    size: int
    adler32: str
    #: its bytes were checked against ``size`` and ``adler32`` (false after a restart until the
    #: uploader did so: a spool file that does not match is never uploaded)
    verified: bool = True


@dataclass(eq=False)
class EarlyUpload:
    """The upload of a file that started while it was still being written sequentially."""

    body: GrowingSpool
    done: trio.Event = field(default_factory=trio.Event)
    #: (url, bytes sent, their adler32) once the bytes were PUT and verified there
    stored: tuple[str, int, str] | None = None


@dataclass(eq=False)
class OutboxFile:
    """One file of the outbox (see the module doc)."""

    scope: str
    dataset: str
    name: str
    spool: SpoolFile
    committed: Committed | None = None
    state: FileState = FileState.WRITING
    error: str = ""
    attempts: int = 0
    writers: int = 0
    #: bumped by every change of its bytes; ``committed_changes`` is its value at the last commit
    changes: int = 0
    committed_changes: int = -1
    #: requests that are changing its journal row: the uploader leaves the file alone meanwhile
    holds: int = 0
    mtime: float = field(default_factory=time.time)
    next_try: float = 0.0
    removed: bool = False
    early: EarlyUpload | None = None
    #: held by a commit (writes wait for it) and by a change that copies the committed bytes
    lock: trio.Lock = field(default_factory=trio.Lock)
    serial: int = field(default_factory=lambda: next(_serials))

    @property
    def size(self) -> int:
        return self.spool.size

    @property
    def did(self) -> DID:
        return DID(self.scope, self.name)

    @property
    def dirty(self) -> bool:
        """Changed since its last commit (or never committed)."""
        return self.committed is None or self.changes != self.committed_changes

    @property
    def temporary(self) -> bool:
        return self.name.startswith(TEMPORARY_PREFIX)

    @property
    def uploadable(self) -> bool:
        """Its committed version can go now: nobody writes or changes it, and it is queued."""
        return (self.state is FileState.QUEUED and not self.dirty and self.writers == 0 and self.holds == 0
                and not self.removed and not self.temporary)

    def snapshot(self) -> tuple[int, str, str, Committed | None]:
        """What an upload attempt started from: a change of any of it makes the attempt moot."""
        return self.changes, self.dataset, self.name, self.committed

    def describe(self) -> str:
        """``user.datalakefs.state``: writing, queued, uploading, failed: reason, done, or why a
        temporary file waits."""
        if self.state is FileState.DONE:
            return "done"
        if self.dirty:
            return "writing"
        if self.state is FileState.FAILED:
            return f"failed: {self.error}"
        if self.temporary:
            return (f"kept: a temporary name (starting with {TEMPORARY_PREFIX!r}) is not uploaded; rename the file "
                    "to upload it")
        if self.error:
            return f"queued (attempt {self.attempts + 1} after: {self.error})"
        return str(self.state.value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "dataset": self.dataset,
            "name": self.name,
            "path": f"{self.scope}/{self.dataset}/{self.name}",
            "size": self.size,
            "state": FileState.WRITING.value if self.dirty else self.state.value,
            "error": self.error,
            "attempts": self.attempts,
        }


class FileTable:
    """The outbox's files by (scope, name) (one DID, one file) and by serial (their inode key)."""

    def __init__(self) -> None:
        self._by_name: dict[tuple[str, str], OutboxFile] = {}
        self._by_serial: dict[int, OutboxFile] = {}

    def __iter__(self) -> Iterator[OutboxFile]:
        return iter(list(self._by_name.values()))

    def get(self, scope: str, name: str) -> OutboxFile | None:
        return self._by_name.get((scope, name))

    def by_serial(self, serial: int) -> OutboxFile | None:
        return self._by_serial.get(serial)

    def add(self, file: OutboxFile) -> None:
        self._by_name[(file.scope, file.name)] = file
        self._by_serial[file.serial] = file

    def discard(self, file: OutboxFile) -> None:
        """Forget ``file`` (and only it: its name may belong to a newer file already)."""
        if self._by_name.get((file.scope, file.name)) is file:
            del self._by_name[(file.scope, file.name)]
        self._by_serial.pop(file.serial, None)

    def rename(self, file: OutboxFile, name: str) -> None:
        self.discard(file)
        file.name = name
        self.add(file)
