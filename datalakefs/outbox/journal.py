"""The outbox journal: the durable record of every upload intent and of the outbox's datasets.

SQLite in WAL mode with ``synchronous=FULL``: a transaction is durable when ``commit`` returns
(the WAL is fsynced), a state change touches one row, and ``outbox list`` is a query. The
alternative, one intent file per upload written by temp file + fsync + rename + directory fsync,
costs two fsyncs per transition and a directory scan at start; SQLite costs one fsync per commit
and survives a kill at any instant by its own recovery.

Rows exist only for *committed* files: a file enters the journal when a ``close()`` or ``fsync()``
made its bytes durable (:meth:`Journal.commit`). A spool file without a row was never acknowledged
and is removed at start. A finished upload deletes its row (:meth:`Journal.finish`, one transaction
for every upload of a registration batch): "done" is the absence of the row, and a kill between the
catalogue registration and that delete is harmless because the uploader recognises an already
registered identical file.

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
create table if not exists datasets (
    scope text not null,
    dataset text not null,
    primary key (scope, dataset)
);
"""


class State(enum.Enum):
    """Where a committed upload stands. ``done`` is not stored: a finished upload has no row."""

    QUEUED = "queued"
    UPLOADING = "uploading"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Intent:
    """What a commit records: upload spool file ``spool`` (``size`` bytes) as ``scope:name``."""

    scope: str
    dataset: str
    name: str
    spool: str
    size: int
    adler32: str | None


@dataclass(frozen=True, slots=True)
class Record(Intent):
    """One journal row: a committed intent and where its upload stands."""

    id: int
    state: State
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


#: Test hook: ``DATALAKEFS_TEST_KILL_AT=<transition>`` SIGKILLs the process right after that journal
#: transition was committed (the crash tests use it to kill at each transition once).
KILL_AT_ENV = "DATALAKEFS_TEST_KILL_AT"


def transition_hook(name: str) -> None:
    """SIGKILL this process when the test hook names ``name`` (see :data:`KILL_AT_ENV`)."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), 9)


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
        # A crash while uploading leaves the row "uploading": it is simply queued again (the uploader
        # is idempotent, see catalogue/rucio_upload.py).
        self._db.execute("update uploads set state = ? where state = ?", (State.QUEUED.value, State.UPLOADING.value))

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._lock_fd)

    # -- uploads -----------------------------------------------------------------------------------

    def commit(self, intents: Sequence[Intent]) -> list[int]:
        """Record (or update) the durable intents to upload each ``spool`` as ``scope:name``, in one
        transaction; returns their ids. A full disk raises :class:`SpoolFullError` (the callers'
        close() then fails with ENOSPC)."""
        now = self._clock()
        ids = []
        with self._lock, _disk_full_as_enospc():
            self._db.execute("begin immediate")
            try:
                for intent in intents:
                    row = self._db.execute(
                        "insert into uploads (scope, dataset, name, spool, size, adler32, state, created, updated)"
                        " values (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                        " on conflict (scope, name) do update set dataset = excluded.dataset,"
                        " spool = excluded.spool, size = excluded.size, adler32 = excluded.adler32,"
                        " state = excluded.state, error = '', updated = excluded.updated returning id",
                        (intent.scope, intent.dataset, intent.name, intent.spool, intent.size, intent.adler32,
                         State.QUEUED.value, now, now),
                    ).fetchone()
                    ids.append(int(row[0]))
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                raise
        transition_hook("commit")
        return ids

    def set_state(self, upload_id: int, state: State, error: str = "", adler32: str | None = None) -> None:
        """Move an upload to ``state``; ``failed`` and a retried ``queued`` carry the reason.
        ``uploading`` is not fsynced (see the module doc)."""
        uploading = state is State.UPLOADING
        with self._lock, self._without_fsync() if uploading else contextlib.nullcontext():
            self._db.execute(
                "update uploads set state = ?, error = ?, attempts = attempts + ?, updated = ?,"
                " adler32 = coalesce(?, adler32) where id = ?",
                (state.value, error, int(uploading), self._clock(), adler32, upload_id),
            )
        transition_hook(state.value)

    def finish(self, upload_ids: Sequence[int]) -> None:
        """These uploads are registered and attached: forget them, in one transaction."""
        self.remove(upload_ids)
        transition_hook("done")

    def remove(self, upload_ids: Sequence[int]) -> None:
        with self._lock:
            self._db.execute(f"delete from uploads where id in ({','.join('?' * len(upload_ids))})",
                             tuple(upload_ids))

    def uploads(self) -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                "select id, scope, dataset, name, spool, size, adler32, state, error, attempts, created, updated"
                " from uploads order by id"
            ).fetchall()
        return [
            Record(id=int(r[0]), scope=str(r[1]), dataset=str(r[2]), name=str(r[3]), spool=str(r[4]), size=int(r[5]),
                   adler32=r[6], state=State(r[7]), error=str(r[8]), attempts=int(r[9]), created=float(r[10]),
                   updated=float(r[11]))
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
