"""The outbox journal: the durable record of every upload intent and of the outbox's datasets.

SQLite in WAL mode with ``synchronous=FULL``: a transaction is durable when ``commit`` returns
(the WAL is fsynced), a state change touches one row, and ``outbox list`` is a query. The
alternative, one intent file per upload written by temp file + fsync + rename + directory fsync,
costs two fsyncs per transition and a directory scan at start; SQLite costs one fsync per commit
and survives a kill at any instant by its own recovery.

Rows exist only for *committed* files: a file enters the journal when a ``close()`` or ``fsync()``
made its bytes durable (:meth:`Journal.commit`), with their size and adler32. A finished upload
deletes its row (:meth:`Journal.remove`, one transaction for every upload of a registration batch):
"done" is the absence of the row, and a kill between the catalogue registration and that delete is
harmless because the uploader recognises an already registered identical file.

What the outbox may delete at start is recorded here too, in the same transactions: a spool file
that a commit superseded, or whose row was removed (done, cancelled, replaced by a rename), is named
in ``garbage`` until it is gone. Spool files carry the journal's :attr:`Journal.id` in their names,
so a spool directory shared with anything else loses nothing to this journal's clean-up.

Only the ``uploading`` mark is written without an fsync (``synchronous=normal`` for that one
transaction): it informs ``outbox list`` while the daemon runs, and a reopened journal turns it back
into ``queued`` anyway, so losing it to a power cut changes nothing. The WAL keeps the order of
transactions, so the next durable commit carries it to disk with its own.

One daemon per journal: an exclusive ``flock`` on ``<journal>.lock``, held while the journal is open
(the kernel drops it when the process dies), keeps a second daemon for the same mount point from
requeueing the first one's uploads or removing its spool files.

Blocking (fsync): the service calls it from worker threads, one call at a time.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from datalakefs.errors import BusyError, SpoolFullError


class JournalInUseError(BusyError):
    """Another daemon holds this outbox journal (the same mount point is mounted)."""

_SCHEMA = """
create table if not exists uploads (
    id integer primary key,
    scope text not null,
    dataset text not null,
    name text not null,
    spool text not null,
    size integer not null,
    adler32 text,
    state text not null,
    error text not null default '',
    attempts integer not null default 0,
    created real not null,
    updated real not null,
    unique (scope, name)
);
create table if not exists garbage (
    spool text primary key
);
create table if not exists meta (
    key text primary key,
    value text not null
);
create table if not exists datasets (
    scope text not null,
    dataset text not null,
    primary key (scope, dataset)
);
"""


class FileState(enum.Enum):
    """Where an outbox file stands. Only the states of committed files are stored (``queued``,
    ``uploading``, ``failed``): a file being written has no row yet, and a finished upload none
    any more."""

    WRITING = "writing"
    QUEUED = "queued"
    UPLOADING = "uploading"
    FAILED = "failed"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Intent:
    """What a commit records: upload spool file ``spool`` (``size`` bytes) as ``scope:name``."""

    scope: str
    dataset: str
    name: str
    spool: str
    size: int
    adler32: str


@dataclass(frozen=True, slots=True)
class Record(Intent):
    """One journal row: a committed intent and where its upload stands."""

    id: int
    state: FileState
    error: str
    attempts: int
    created: float
    updated: float


@contextlib.contextmanager
def _disk_full_as_enospc() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "full" in str(exc):
            raise SpoolFullError(f"outbox journal: {exc}") from exc
        raise


class Journal:
    """The SQLite journal at ``path``. Thread-safe by one lock; every write commits durably."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise JournalInUseError(f"outbox journal {path} is in use by another datalakefs daemon") from None
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=full")
        self._db.executescript(_SCHEMA)
        self._db.execute("insert or ignore into meta values ('id', ?)", (secrets.token_hex(4),))
        #: this journal's identity: the prefix of the spool files it owns
        self.id = str(self._db.execute("select value from meta where key = 'id'").fetchone()[0])
        # A crash while uploading leaves the row "uploading": it is simply queued again (the uploader
        # is idempotent, see catalogue/rucio_upload.py).
        self._db.execute("update uploads set state = ? where state = ?",
                         (FileState.QUEUED.value, FileState.UPLOADING.value))

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._lock_fd)

    # -- uploads -----------------------------------------------------------------------------------

    def commit(self, intents: Sequence[Intent]) -> list[int]:
        """Record (or update) the durable intents to upload each ``spool`` as ``scope:name``, in one
        transaction; returns their ids. The spool file of an intent that a new one replaces becomes
        garbage. A full disk raises :class:`SpoolFullError` (the callers' close() then fails with
        ENOSPC)."""
        now = self._clock()
        ids = []
        with self._lock, _disk_full_as_enospc():
            self._db.execute("begin immediate")
            try:
                for intent in intents:
                    self._db.execute("insert or ignore into garbage select spool from uploads"
                                     " where scope = ? and name = ? and spool != ?",
                                     (intent.scope, intent.name, intent.spool))
                    row = self._db.execute(
                        "insert into uploads (scope, dataset, name, spool, size, adler32, state, created, updated)"
                        " values (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                        " on conflict (scope, name) do update set dataset = excluded.dataset,"
                        " spool = excluded.spool, size = excluded.size, adler32 = excluded.adler32,"
                        " state = excluded.state, error = '', updated = excluded.updated returning id",
                        (intent.scope, intent.dataset, intent.name, intent.spool, intent.size, intent.adler32,
                         FileState.QUEUED.value, now, now),
                    ).fetchone()
                    ids.append(int(row[0]))
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                raise
        return ids

    def set_state(self, upload_id: int, state: FileState, error: str = "") -> None:
        """Move an upload to ``state``; ``failed`` and a retried ``queued`` carry the reason.
        ``uploading`` is not fsynced (see the module doc)."""
        uploading = state is FileState.UPLOADING
        with self._lock, _disk_full_as_enospc(), self._without_fsync() if uploading else contextlib.nullcontext():
            self._db.execute(
                "update uploads set state = ?, error = ?, attempts = attempts + ?, updated = ? where id = ?",
                (state.value, error, int(uploading), self._clock(), upload_id),
            )

    def rename(self, upload_id: int, dataset: str, name: str) -> None:
        """The committed file ``upload_id`` is now ``dataset/name``; an intent that held that name
        goes, its spool file to the garbage (rename(2) replaces its target)."""
        with self._lock, _disk_full_as_enospc():
            self._db.execute("begin immediate")
            try:
                self._db.execute("insert or ignore into garbage select spool from uploads"
                                 " where scope = (select scope from uploads where id = ?) and name = ?",
                                 (upload_id, name))
                self._db.execute("delete from uploads where scope = (select scope from uploads where id = ?)"
                                 " and name = ?", (upload_id, name))
                self._db.execute("update uploads set dataset = ?, name = ?, updated = ? where id = ?",
                                 (dataset, name, self._clock(), upload_id))
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                raise

    def remove(self, upload_ids: Sequence[int]) -> None:
        """These uploads are done (registered and attached) or cancelled: forget them in one
        transaction; their spool files become garbage."""
        marks = ",".join("?" * len(upload_ids))
        with self._lock, _disk_full_as_enospc():
            self._db.execute("begin immediate")
            try:
                self._db.execute(f"insert or ignore into garbage select spool from uploads where id in ({marks})",
                                 tuple(upload_ids))
                self._db.execute(f"delete from uploads where id in ({marks})", tuple(upload_ids))
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                raise

    def garbage(self) -> list[str]:
        """Spool files nothing refers to any more (deleted, or to delete)."""
        with self._lock:
            return [str(row[0]) for row in self._db.execute("select spool from garbage")]

    def forget_garbage(self, spools: Sequence[str]) -> None:
        """These spool files are gone. Not fsynced: deleting a missing file again is harmless."""
        with self._lock, self._without_fsync():
            self._db.executemany("delete from garbage where spool = ?", [(spool,) for spool in spools])

    def uploads(self) -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                "select id, scope, dataset, name, spool, size, adler32, state, error, attempts, created, updated"
                " from uploads order by id"
            ).fetchall()
        return [
            Record(id=int(r[0]), scope=str(r[1]), dataset=str(r[2]), name=str(r[3]), spool=str(r[4]), size=int(r[5]),
                   adler32=str(r[6] or ""), state=FileState(r[7]), error=str(r[8]), attempts=int(r[9]),
                   created=float(r[10]), updated=float(r[11]))
            for r in rows
        ]

    # -- datasets ----------------------------------------------------------------------------------

    def add_dataset(self, scope: str, dataset: str) -> None:
        with self._lock:
            self._db.execute("insert or ignore into datasets values (?, ?)", (scope, dataset))

    def remove_dataset(self, scope: str, dataset: str) -> None:
        with self._lock:
            self._db.execute("delete from datasets where scope = ? and dataset = ?", (scope, dataset))

    def datasets(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(str(s), str(d)) for s, d in self._db.execute("select scope, dataset from datasets")]

    @contextlib.contextmanager
    def _without_fsync(self) -> Iterator[None]:
        """Transactions inside commit at ``synchronous=normal`` (see the module doc)."""
        self._db.execute("pragma synchronous=normal")
        try:
            yield
        finally:
            self._db.execute("pragma synchronous=full")
