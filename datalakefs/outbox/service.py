"""The outbox service: files being written, their durable upload intents, and the uploader.

Life of an outbox file (SPEC §5)::

    create ──► writing ──close()/fsync()──► queued ──► uploading ──► done (leaves the outbox)
                  ▲                           │  ▲          │
                  └────── reopened ───────────┘  └─ retry ◄─┴──► failed: reason (stays visible)

* ``writing`` lives in memory only: a file becomes an upload intent when a ``close()`` or ``fsync()``
  made it durable (:meth:`Outbox.commit`: fsync of the spool file, then a journal commit). Only then
  does the call return success.
* The uploader moves the bytes of at most ``upload_concurrency`` files at once, never of a file that
  is open for writing. The catalogue steps before and after (is the DID there, where do the bytes
  go; register, attach, rule) are batched across files (outbox/batcher.py): a file is located
  while still queued, and becomes ``uploading`` (unchangeable) when it gets a transfer slot.
* A failure worth a retry (server, storage, credentials, quota) requeues the file with exponential
  backoff and the reason visible; a conflict (the DID exists with other content) or a name the
  catalogue refuses fails it until ``retry``.
* After a restart every journal row is queued again; the uploader's steps are idempotent
  (catalogue/rucio_upload.py), so a resumed upload neither duplicates nor overwrites.

Everything here runs on the trio thread; fsyncs, journal commits, checksum passes and the upload
itself run in worker threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.catalogue.upload import Registration, SpoolChangedError, UploadConflictError, Uploader, UploadJob
from datalakefs.errors import (
    AlreadyExistsError,
    BusyError,
    DatalakeError,
    InvalidNameError,
    NotEmptyError,
    NotFoundError,
)
from datalakefs.model import DID
from datalakefs.outbox.batcher import Batcher
from datalakefs.outbox.journal import Intent, Journal, Record, State, transition_hook
from datalakefs.outbox.spool import GrowingSpool, SpoolFile, StreamAbandonedError, file_adler32, sync_directory

log = logging.getLogger(__name__)

#: Retry delays: 1 s, 2 s, 4 s ... capped at 5 minutes.
BACKOFF_BASE: Final = 1.0
BACKOFF_CAP: Final = 300.0

#: Seconds a "not registered yet" answer is trusted before a file's bytes are stored.
LOCATION_FRESH: Final = 10.0
#: Most files per catalogue call of the uploader's batch steps (locate, register).
BATCH_LIMIT: Final = 200

WRITING: Final = "writing"
DONE: Final = "done"


@dataclass(eq=False)
class EarlyUpload:
    """The upload of a file that started while it was still being written sequentially."""

    body: GrowingSpool
    done: trio.Event = field(default_factory=trio.Event)
    #: (url, bytes sent, their adler32) once the bytes were PUT and verified there
    stored: tuple[str, int, str] | None = None


@dataclass(eq=False)
class OutboxFile:
    """One file of the outbox, as the filesystem and the uploader see it."""

    scope: str
    dataset: str
    name: str
    spool: SpoolFile
    upload_id: int | None = None
    adler32: str | None = None
    state: str = WRITING
    error: str = ""
    attempts: int = 0
    writers: int = 0
    dirty: bool = True
    version: int = 0
    mtime: float = field(default_factory=time.time)
    next_try: float = 0.0
    removed: bool = False
    early: EarlyUpload | None = None

    @property
    def size(self) -> int:
        return self.spool.size

    @property
    def did(self) -> DID:
        return DID(self.scope, self.name)

    def describe(self) -> str:
        """``user.datalakefs.state``: queued, uploading, done, failed: reason (and the last error)."""
        if self.state == State.FAILED.value:
            return f"failed: {self.error}"
        if self.state == State.QUEUED.value and self.error:
            return f"queued (attempt {self.attempts + 1} after: {self.error})"
        return self.state

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "dataset": self.dataset,
            "name": self.name,
            "path": f"{self.scope}/{self.dataset}/{self.name}",
            "size": self.size,
            "state": self.state,
            "error": self.error,
            "attempts": self.attempts,
        }


UploadListener = Callable[[OutboxFile], None]


class Outbox:
    """The outbox of one mount (see the module doc). Used from the trio thread only."""

    def __init__(
        self,
        journal: Journal,
        uploader: Uploader,
        catalogue: CachedCatalogue,
        spool_dir: Path,
        *,
        concurrency: int = 4,
        reserve: int = 0,
        upload_while_writing: int = 0,
    ) -> None:
        self._journal = journal
        self._uploader = uploader
        self._catalogue = catalogue
        self._spool_dir = spool_dir
        self._transfer_slots = trio.Semaphore(max(1, concurrency))
        # files between queued and done; more than the transfer slots, so that locating them batches
        self._pipeline: set[OutboxFile] = set()
        self._pipeline_limit = max(1, concurrency) + BATCH_LIMIT
        self._reserve = reserve
        self._early_after = upload_while_writing
        self._uploads: trio.Nursery | None = None  # the uploader's, while it runs
        self._uploaded_early = 0
        self._files: dict[tuple[str, str], OutboxFile] = {}  # (scope, name) → file
        self._datasets: set[tuple[str, str]] = set(journal.datasets())
        self._listeners: list[UploadListener] = []
        self._uploaded = 0
        self._wake = trio.Event()
        self._locator: Batcher[UploadJob, str | None] = Batcher(uploader.locate, BATCH_LIMIT)
        self._registrar: Batcher[Registration, None] = Batcher(
            lambda registrations: uploader.register(registrations, _step_hook), BATCH_LIMIT
        )
        self._committer: Batcher[tuple[SpoolFile, Intent], int] = Batcher(self._commit_group, BATCH_LIMIT)
        self._finisher: Batcher[tuple[int, Path], None] = Batcher(self._forget, BATCH_LIMIT)
        self._resume(journal.uploads())

    def _resume(self, records: list[Record]) -> None:
        """Queue every journal row again and drop spool files that were never committed."""
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        for record in records:
            spool = SpoolFile(self._spool_dir / record.spool, self._reserve)
            state = record.state.value
            # a file reopened and being rewritten at the crash differs from its last commit
            adler32 = record.adler32 if spool.size == record.size else None
            self._files[(record.scope, record.name)] = OutboxFile(
                record.scope, record.dataset, record.name, spool, record.id, adler32, state,
                record.error, record.attempts, dirty=False, mtime=record.updated,
            )
            self._datasets.add((record.scope, record.dataset))
        known = {f.spool.name for f in self._files.values()}
        for path in self._spool_dir.glob("*.spool"):
            if path.name not in known:
                log.info("event=outbox-orphan-removed spool=%s reason=never-committed", path.name)
                path.unlink()
        if records:
            log.info("event=outbox-resume uploads=%d", len(records))

    def close(self) -> None:
        """Release the journal (the daemon is ending; in-flight uploads resume at the next start)."""
        self._journal.close()

    def add_listener(self, listener: UploadListener) -> None:
        """``listener(file)`` runs on the trio thread after ``file`` was uploaded and left the outbox."""
        self._listeners.append(listener)

    # -- the tree ----------------------------------------------------------------------------------

    def scopes(self) -> list[str]:
        return sorted({scope for scope, _ in self._datasets})

    def datasets(self, scope: str) -> list[str]:
        return sorted(dataset for s, dataset in self._datasets if s == scope)

    def has_dataset(self, scope: str, dataset: str) -> bool:
        return (scope, dataset) in self._datasets

    def files(self, scope: str, dataset: str) -> list[OutboxFile]:
        return sorted((f for f in self._files.values() if f.scope == scope and f.dataset == dataset),
                      key=lambda f: f.name)

    def file(self, scope: str, dataset: str, name: str) -> OutboxFile:
        found = self._files.get((scope, name))
        if found is None or found.dataset != dataset:
            raise NotFoundError(f".outbox/{scope}/{dataset}/{name}")
        return found

    async def make_dataset(self, scope: str, dataset: str) -> None:
        """mkdir ``.outbox/<scope>/<dataset>``: the scope must exist, the name must be valid."""
        if (scope, dataset) in self._datasets:
            raise AlreadyExistsError(f".outbox/{scope}/{dataset}")
        self._uploader.check_name(dataset)
        if scope not in await self._catalogue.list_scopes():
            raise NotFoundError(f"scope {scope!r} does not exist in the catalogue: ask its admin to add it")
        await trio.to_thread.run_sync(self._journal.add_dataset, scope, dataset)
        self._datasets.add((scope, dataset))

    async def remove_dataset(self, scope: str, dataset: str) -> None:
        if (scope, dataset) not in self._datasets:
            raise NotFoundError(f".outbox/{scope}/{dataset}")
        if self.files(scope, dataset):
            raise NotEmptyError(f".outbox/{scope}/{dataset} still holds files waiting for upload")
        await trio.to_thread.run_sync(self._journal.remove_dataset, scope, dataset)
        self._datasets.discard((scope, dataset))

    # -- writing -----------------------------------------------------------------------------------

    def create(self, scope: str, dataset: str, name: str) -> OutboxFile:
        """A new, empty file being written (not yet an upload intent)."""
        if (scope, dataset) not in self._datasets:
            raise NotFoundError(f".outbox/{scope}/{dataset}")
        self._uploader.check_name(name)
        other = self._files.get((scope, name))
        if other is not None:
            raise AlreadyExistsError(
                f"{scope}:{name} is already waiting in .outbox/{scope}/{other.dataset}: one DID, one file"
            )
        created = OutboxFile(scope, dataset, name, SpoolFile.create(self._spool_dir, self._reserve))
        self._files[(scope, name)] = created
        return created

    def open_for_writing(self, file: OutboxFile) -> None:
        if file.state == State.UPLOADING.value:
            raise BusyError(f"{file.scope}:{file.name} is being uploaded")
        file.writers += 1
        if file.writers > 1:
            _abandon_early(file)  # two writers: no longer a plain sequential stream

    def write(self, file: OutboxFile, offset: int, data: bytes) -> int:
        self._check_changeable(file)
        written = file.spool.write(offset, data)
        file.dirty = True
        file.version += 1
        file.mtime = time.time()
        self._follow_write(file)
        return written

    def _follow_write(self, file: OutboxFile) -> None:
        """Feed the file's early upload, or abandon it when the write was not sequential; start one
        once a file written sequentially by one writer holds ``upload_while_writing`` bytes."""
        sequential = file.spool.sequential
        if file.early is not None:
            if file.early.done.is_set():
                return  # over (abandoned or sent): nothing listens any more
            if sequential:
                file.early.body.grown(file.size)
            else:
                file.early.body.abandon()
        elif (sequential and self._early_after and file.size >= self._early_after and file.writers == 1
              and self._uploads is not None):
            file.early = EarlyUpload(GrowingSpool(file.spool.path))
            file.early.body.grown(file.size)
            self._uploads.start_soon(self._upload_early, file, file.early)

    async def truncate(self, file: OutboxFile, size: int) -> None:
        """``truncate``/``ftruncate``; without an open writer (truncate(2) of a path) nothing else
        would commit the change, so it is committed at once."""
        self._check_changeable(file)
        if size != file.size:
            _abandon_early(file)
            file.spool.truncate(size)
            file.dirty = True
            file.version += 1
            file.mtime = time.time()
        if file.writers == 0:
            await self.commit(file)
            file.spool.close()

    async def commit(self, file: OutboxFile) -> None:
        """Make the file's current bytes and its upload intent durable (close/fsync). The closes that
        arrive together share one directory fsync and one journal transaction (:meth:`_commit_group`)."""
        if file.removed or not file.dirty:
            return
        size, adler32, version = file.size, file.spool.adler32, file.version
        upload_id = await self._committer.submit(
            (file.spool, Intent(file.scope, file.dataset, file.name, file.spool.name, size, adler32))
        )
        if file.removed:  # removed while the commit ran: the intent goes too
            await trio.to_thread.run_sync(self._journal.remove, [upload_id])
            return
        file.upload_id, file.adler32 = upload_id, adler32
        file.dirty = file.version != version  # written again while the commit ran
        file.state, file.error, file.attempts, file.next_try = State.QUEUED.value, "", 0, 0.0
        self._wake.set()

    def close_for_writing(self, file: OutboxFile) -> None:
        file.writers -= 1
        if file.writers == 0:
            file.spool.close()
            if file.early is not None and file.upload_id is not None and not file.dirty and not file.removed:
                file.early.body.end(file.size)  # committed and closed: the early upload can finish
            else:
                _abandon_early(file)
            if file.removed:
                file.spool.delete()
            elif file.upload_id is None:
                # every close() commits, so an uncommitted file here had its flush fail: it was never
                # acknowledged, and without a writer nothing will ever commit it
                self._drop(file)
            self._wake.set()

    def read(self, file: OutboxFile, offset: int, size: int) -> bytes:
        return file.spool.read(offset, size)

    def _check_changeable(self, file: OutboxFile) -> None:
        if file.state == State.UPLOADING.value:
            raise BusyError(f"{file.scope}:{file.name} is being uploaded")

    # -- control -----------------------------------------------------------------------------------

    async def cancel(self, file: OutboxFile) -> None:
        """``rm`` of an outbox file: a queued, failed or unfinished upload is dropped with its bytes."""
        self._check_changeable(file)
        if file.upload_id is not None:
            await trio.to_thread.run_sync(self._journal.remove, [file.upload_id])
        self._drop(file)
        log.info("event=outbox-cancelled did=%s", file.did)

    async def retry(self, file: OutboxFile) -> None:
        """Queue a failed (or backing-off) upload again now."""
        if file.upload_id is None or file.state == State.UPLOADING.value:
            return
        await trio.to_thread.run_sync(self._journal.set_state, file.upload_id, State.QUEUED)
        file.state, file.error, file.attempts, file.next_try = State.QUEUED.value, "", 0, 0.0
        self._wake.set()

    def _drop(self, file: OutboxFile) -> None:
        file.removed = True
        _abandon_early(file)
        if self._files.get((file.scope, file.name)) is file:
            del self._files[(file.scope, file.name)]
        if file.writers == 0:
            file.spool.delete()

    # -- visibility --------------------------------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        return [f.as_dict() for f in sorted(self._files.values(), key=lambda f: (f.scope, f.dataset, f.name))]

    def summary(self) -> dict[str, int]:
        counts = {WRITING: 0, State.QUEUED.value: 0, State.UPLOADING.value: 0, State.FAILED.value: 0}
        pending_bytes = 0
        for f in self._files.values():
            counts[f.state] += 1
            pending_bytes += f.size
        return {**counts, "pending_bytes": pending_bytes, "uploaded": self._uploaded,
                "uploaded_while_writing": self._uploaded_early}

    def pending(self) -> int:
        """Committed uploads that have not finished."""
        return sum(1 for f in self._files.values() if f.upload_id is not None)

    # -- the uploader ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as uploads:
            self._uploads = uploads
            task_status.started()
            while True:
                self._wake = trio.Event()
                now = trio.current_time()
                for file in self._ready(now)[: self._pipeline_limit - len(self._pipeline)]:
                    self._pipeline.add(file)
                    uploads.start_soon(self._upload, file)
                with trio.move_on_at(self._next_retry(now)):
                    await self._wake.wait()

    def _ready(self, now: float) -> list[OutboxFile]:
        return [f for f in self._files.values()
                if f.state == State.QUEUED.value and f.writers == 0 and f.next_try <= now and not f.dirty
                and f not in self._pipeline]

    def _next_retry(self, now: float) -> float:
        waiting = [f.next_try for f in self._files.values() if f.state == State.QUEUED.value and f.next_try > now]
        return min(waiting, default=now + 3600.0)

    async def _upload(self, file: OutboxFile) -> None:
        """One file through the uploader's steps.

        It is located while still queued, together with the other files ready then; a write or an
        ``rm`` meanwhile makes this attempt moot (the next commit queues the file again). It becomes
        ``uploading``, and unchangeable, only once it holds one of the ``concurrency`` transfer slots;
        it gives the slot back when its bytes are stored, and its registration waits for the next
        batch.
        """
        assert file.upload_id is not None
        version, stored = file.version, False
        try:
            adler32 = await self._checksum(file)
            job = UploadJob(file.scope, file.dataset, file.name, file.spool.path, file.size, adler32)
            url, located = await self._locator.submit(job), trio.current_time()
            if file.early is not None:
                await file.early.done.wait()
            async with self._transfer_slots:
                if not self._unchanged(file, version):
                    return
                file.state = State.UPLOADING.value
                await trio.to_thread.run_sync(self._journal.set_state, file.upload_id, State.UPLOADING, "", adler32)
                log.info("event=upload-start did=%s dataset=%s bytes=%d", file.did, file.dataset, file.size)
                if trio.current_time() - located > LOCATION_FRESH:
                    # the name may have been registered since (with other bytes at the same PFN, which
                    # a PUT would overwrite): ask again, unless the answer is recent
                    url = await self._locator.submit(job)
                if url is not None and file.early is not None and file.early.stored == (url, job.size, adler32):
                    stored = True  # sent while it was written: the same bytes are at the URL
                    self._uploaded_early += 1
                elif url is not None:
                    await trio.to_thread.run_sync(self._uploader.store, job, url, abandon_on_cancel=True)
                    stored = True
                    _step_hook("stored")
            await self._registrar.submit(Registration(job, stored))
        except (UploadConflictError, InvalidNameError) as exc:
            await self._fail(file, version, str(exc))
        except SpoolChangedError as exc:
            file.adler32 = None
            await self._requeue(file, version, str(exc))
        except DatalakeError as exc:
            await self._requeue(file, version, str(exc))
        except OSError as exc:  # the spool file itself (HTTP errors arrive as DatalakeErrors)
            await self._fail(file, version, f"spool file {file.spool.path} unreadable: {exc.strerror or exc}")
        except Exception as exc:
            log.exception("event=upload-bug did=%s", file.did)
            await self._requeue(file, version, f"{type(exc).__name__}: {exc}")
        else:
            file.spool.close()  # here: its pages are freed by the unlink, in the worker thread
            await self._finisher.submit((file.upload_id, file.spool.path))
            self._finished(file, stored)
        finally:
            self._pipeline.discard(file)
            self._wake.set()

    async def _upload_early(self, file: OutboxFile, early: EarlyUpload) -> None:
        """Send a file's bytes while it is still written (see ``upload_while_writing``), if a transfer
        slot is free now and it is not the last one. It only puts bytes at the URL: :meth:`_upload`
        uses them once the file is committed and closed with exactly those bytes, else it stores the
        file as usual. A kill meanwhile leaves at most a partial object at the PFN, registered
        nowhere."""
        # a slow writer may hold its slot for long: never take the last one, so that files already
        # closed keep moving
        if self._transfer_slots.value < 2:
            early.body.abandon()
            early.done.set()
            return
        self._transfer_slots.acquire_nowait()
        try:
            # size 0: a DID of this name that exists already is a conflict here, and the usual upload
            # after close() tells whether it holds the same bytes
            url = await self._locator.submit(UploadJob(file.scope, file.dataset, file.name, file.spool.path, 0, ""))
            if url is not None:
                log.info("event=upload-early-start did=%s bytes_so_far=%d", file.did, file.size)
                sent, adler32 = await trio.to_thread.run_sync(self._uploader.store_stream, url, early.body,
                                                              abandon_on_cancel=True)
                early.stored = (url, sent, adler32)
                _step_hook("streamed")
        except (DatalakeError, StreamAbandonedError) as exc:
            log.info("event=upload-early-abandoned did=%s reason=%s", file.did, exc)
        finally:
            self._transfer_slots.release()
            early.body.abandon()  # wakes a transfer thread that was left behind by a cancellation
            early.done.set()

    @staticmethod
    def _unchanged(file: OutboxFile, version: int) -> bool:
        """``file`` still holds the bytes an upload attempt started with, and nobody is writing it."""
        return not file.removed and file.version == version and file.writers == 0 and file.state != WRITING

    async def _checksum(self, file: OutboxFile) -> str:
        """The journal's adler32, or one pass over the spool file when writes were not sequential."""
        if file.adler32:
            return file.adler32
        size, adler32 = await trio.to_thread.run_sync(file_adler32, file.spool.path)
        if size != file.size:
            raise DatalakeError(f"spool file of {file.did} has {size} bytes, the journal says {file.size}")
        file.adler32 = adler32
        return adler32

    async def _fail(self, file: OutboxFile, version: int, reason: str) -> None:
        assert file.upload_id is not None
        if not self._unchanged(file, version):
            return  # the failure was of bytes that are gone: the new ones get their own attempt
        log.warning("event=upload-failed did=%s reason=%s", file.did, reason)
        await trio.to_thread.run_sync(self._journal.set_state, file.upload_id, State.FAILED, reason)
        file.state, file.error = State.FAILED.value, reason

    async def _requeue(self, file: OutboxFile, version: int, reason: str) -> None:
        assert file.upload_id is not None
        if not self._unchanged(file, version):
            return
        file.attempts += 1
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (file.attempts - 1))
        log.warning("event=upload-retry did=%s attempt=%d in_s=%.0f reason=%s", file.did, file.attempts, delay,
                    reason)
        await trio.to_thread.run_sync(self._journal.set_state, file.upload_id, State.QUEUED, reason)
        file.state, file.error, file.next_try = State.QUEUED.value, reason, trio.current_time() + delay

    def _commit_group(self, group: Sequence[tuple[SpoolFile, Intent]]) -> list[int | Exception]:
        """Worker thread: fsync each spool file, then (once) their directory, then record every
        intent whose bytes are durable in one journal transaction."""
        failed: dict[int, Exception] = {}
        for index, (spool, _) in enumerate(group):
            try:
                spool.sync()
            except (OSError, DatalakeError) as exc:
                failed[index] = exc
        synced = [member for index, member in enumerate(group) if index not in failed]
        if any(not spool.entry_durable for spool, _ in synced):
            sync_directory(self._spool_dir)
            for spool, _ in synced:
                spool.entry_durable = True
        ids = iter(self._journal.commit([intent for _, intent in synced]) if synced else [])
        return [failed[index] if index in failed else next(ids) for index in range(len(group))]

    def _forget(self, finished: Sequence[tuple[int, Path]]) -> list[None]:
        """Worker thread: the finished uploads of a batch leave the journal in one transaction, then
        their spool files go (a kill in between leaves spool files without a row: removed at start)."""
        self._journal.finish([upload_id for upload_id, _ in finished])
        for _, spool in finished:
            spool.unlink(missing_ok=True)
        return [None] * len(finished)

    def _finished(self, file: OutboxFile, stored: bool) -> None:
        log.info("event=upload-done did=%s dataset=%s bytes=%d transferred=%s", file.did, file.dataset,
                 file.size, stored)
        file.state, file.error = DONE, ""
        self._uploaded += 1
        del self._files[(file.scope, file.name)]
        file.removed = True
        self._catalogue.invalidate(file.did)
        self._catalogue.invalidate_collection(DID(file.scope, file.dataset))
        for listener in self._listeners:
            listener(file)


def _abandon_early(file: OutboxFile) -> None:
    if file.early is not None:
        file.early.body.abandon()


def _step_hook(step: str) -> None:
    transition_hook(f"upload-{step}")
