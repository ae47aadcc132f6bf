"""The upload pipeline: committed outbox files to the lake.

The bytes of at most ``concurrency`` files move at once, never of a file that is open for writing,
changed since its commit, or held by a request (a rename, an ``rm``). The catalogue steps before and
after (is the DID there, where do the bytes go; register, attach, rule) are batched across files
(outbox/batcher.py): a file is located while still queued, and becomes ``uploading`` (unchangeable)
when it gets a transfer slot, after checking synchronously that nothing changed it meanwhile.

A failure worth a retry (server, storage, credentials, quota) requeues the file with exponential
backoff and the reason visible; a conflict (the DID exists with other content), a name the catalogue
refuses, or a spool file that does not match its commit fails it until ``retry``. Nothing here takes
the mount down: an unexpected error, or a journal that cannot be written (a full disk), fails the
file with the reason and is logged.

Runs on the trio thread; checksums, journal commits and the transfers run in worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final

import trio

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.catalogue.upload import (
    Registration,
    SpoolChangedError,
    TransitionHooks,
    UploadConflictError,
    Uploader,
    UploadJob,
)
from datalakefs.errors import DatalakeError, InvalidNameError
from datalakefs.model import DID
from datalakefs.outbox.batcher import Batcher
from datalakefs.outbox.files import Committed, EarlyUpload, FileTable, OutboxFile
from datalakefs.outbox.journal import FileState, Journal
from datalakefs.outbox.spool import GrowingSpool, SpoolFile, StreamAbandonedError, file_adler32

log = logging.getLogger(__name__)

#: Retry delays: 1 s, 2 s, 4 s ... capped at 5 minutes.
BACKOFF_BASE: Final = 1.0
BACKOFF_CAP: Final = 300.0
#: Seconds a "not registered yet" answer is trusted before a file's bytes are stored.
LOCATION_FRESH: Final = 10.0
#: Most files per catalogue call of the batch steps (locate, register) and per journal transaction.
BATCH_LIMIT: Final = 200

UploadListener = Callable[[OutboxFile], None]


class UploadPipeline:
    """The uploader of one outbox (see the module doc). Used from the trio thread only."""

    def __init__(self, journal: Journal, uploader: Uploader, catalogue: CachedCatalogue, files: FileTable,
                 hooks: TransitionHooks, *, concurrency: int) -> None:
        self._journal = journal
        self._uploader = uploader
        self._catalogue = catalogue
        self._files = files
        self._hooks = hooks
        self._transfer_slots = trio.Semaphore(max(1, concurrency))
        # files between queued and done; more than the transfer slots, so that locating them batches
        self._pipeline: set[OutboxFile] = set()
        self._pipeline_limit = max(1, concurrency) + BATCH_LIMIT
        self._uploads: trio.Nursery | None = None  # while it runs
        self._wake = trio.Event()
        self._listeners: list[UploadListener] = []
        self._locator: Batcher[UploadJob, str | None] = Batcher(uploader.locate, BATCH_LIMIT)
        self._registrar: Batcher[Registration, None] = Batcher(uploader.register, BATCH_LIMIT)
        self._finisher: Batcher[tuple[int, SpoolFile], None] = Batcher(self._forget, BATCH_LIMIT)
        self.uploaded = 0
        self.uploaded_early = 0

    def add_listener(self, listener: UploadListener) -> None:
        """``listener(file)`` runs on the trio thread after ``file`` was uploaded and left the outbox."""
        self._listeners.append(listener)

    def wake(self) -> None:
        """Something may have become ready to upload."""
        self._wake.set()

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
        return [f for f in self._files if f.uploadable and f.next_try <= now and f not in self._pipeline]

    def _next_retry(self, now: float) -> float:
        waiting = [f.next_try for f in self._files if f.state is FileState.QUEUED and f.next_try > now]
        return min(waiting, default=now + 3600.0)

    # -- one file --------------------------------------------------------------------------------

    async def _upload(self, file: OutboxFile) -> None:
        try:
            await self._attempt(file)
        except Exception as exc:  # a bug, or a journal that cannot be written: the mount stays up
            log.exception("event=upload-error did=%s", file.did)
            file.state, file.error = FileState.FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            self._pipeline.discard(file)
            self._wake.set()

    async def _attempt(self, file: OutboxFile) -> None:
        """One attempt at the file's committed version.

        It is located while still queued, together with the other files ready then; a change of the
        file meanwhile (a write, a rename, an ``rm``) makes the attempt moot. It becomes ``uploading``,
        and unchangeable, only once it holds one of the transfer slots; it gives the slot back when
        its bytes are stored, and its registration waits for the next batch.
        """
        started = file.snapshot()
        committed = file.committed
        assert committed is not None
        stored = False
        try:
            if not committed.verified:
                await self._verify(file, committed)
            job = UploadJob(file.scope, file.dataset, file.name, committed.spool.path, committed.size,
                            committed.adler32)
            url, located = await self._locator.submit(job), trio.current_time()
            if file.early is not None:
                await file.early.done.wait()
            async with self._transfer_slots:
                if not self._unchanged(file, started):
                    return
                file.state = FileState.UPLOADING
                await trio.to_thread.run_sync(self._journal.set_state, committed.upload_id, FileState.UPLOADING)
                self._hooks.reached("uploading")
                log.info("event=upload-start did=%s dataset=%s bytes=%d", file.did, file.dataset, job.size)
                if trio.current_time() - located > LOCATION_FRESH:
                    # the name may have been registered since (with other bytes at the same PFN, which
                    # a PUT would overwrite): ask again, unless the answer is recent
                    url = await self._locator.submit(job)
                if url is not None and file.early is not None and file.early.stored == (url, job.size, job.adler32):
                    stored = True  # sent while it was written: the same bytes are at the URL
                    self.uploaded_early += 1
                elif url is not None:
                    await trio.to_thread.run_sync(self._uploader.store, job, url, abandon_on_cancel=True)
                    stored = True
                    self._hooks.reached("upload-stored")
            await self._registrar.submit(Registration(job, stored))
        except (UploadConflictError, InvalidNameError, SpoolChangedError) as exc:
            await self._fail(file, started, str(exc))
        except DatalakeError as exc:
            await self._requeue(file, started, str(exc))
        except OSError as exc:  # the spool file itself (HTTP errors arrive as DatalakeErrors)
            await self._fail(file, started, f"spool file {committed.spool.path.name} unreadable: {exc.strerror or exc}")
        else:
            committed.spool.close()  # here: its pages are freed by the unlink, in the worker thread
            await self._finisher.submit((committed.upload_id, committed.spool))
            self._finished(file, stored)

    async def _verify(self, file: OutboxFile, committed: Committed) -> None:
        """After a restart: the spool file must hold exactly what was committed."""
        size, adler32 = await trio.to_thread.run_sync(file_adler32, committed.spool.path)
        if not committed.adler32 and size == committed.size:
            # a row of an earlier version, committed without its checksum: trust its size
            log.warning("event=outbox-legacy-row did=%s adler32=%s", file.did, adler32)
            committed.adler32 = adler32
        if (size, adler32) != (committed.size, committed.adler32):
            raise SpoolChangedError(
                f"its spool file holds {size} bytes with adler32 {adler32}, not the {committed.size} bytes with "
                f"adler32 {committed.adler32} of its last close(): not uploaded (write the file again, or rm it)")
        committed.verified = True

    @staticmethod
    def _unchanged(file: OutboxFile, started: tuple[object, ...]) -> bool:
        """``file`` still holds the version an attempt started with, and nobody changes it."""
        return file.snapshot() == started and file.uploadable

    async def _fail(self, file: OutboxFile, started: tuple[object, ...], reason: str) -> None:
        if file.snapshot() != started or file.removed or file.committed is None:
            return  # the failure was of a version that is gone: the new one gets its own attempt
        log.warning("event=upload-failed did=%s reason=%s", file.did, reason)
        file.state, file.error = FileState.FAILED, reason
        await trio.to_thread.run_sync(self._journal.set_state, file.committed.upload_id, FileState.FAILED, reason)

    async def _requeue(self, file: OutboxFile, started: tuple[object, ...], reason: str) -> None:
        if file.snapshot() != started or file.removed or file.committed is None:
            return
        file.attempts += 1
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (file.attempts - 1))
        log.warning("event=upload-retry did=%s attempt=%d in_s=%.0f reason=%s", file.did, file.attempts, delay,
                    reason)
        file.state, file.error, file.next_try = FileState.QUEUED, reason, trio.current_time() + delay
        await trio.to_thread.run_sync(self._journal.set_state, file.committed.upload_id, FileState.QUEUED, reason)

    def _forget(self, finished: Sequence[tuple[int, SpoolFile]]) -> list[None]:
        """Worker thread: the finished uploads of a batch leave the journal in one transaction (their
        spool files become garbage there), then their spool files go."""
        self._journal.remove([upload_id for upload_id, _ in finished])
        self._hooks.reached("done")
        for _, spool in finished:
            spool.path.unlink(missing_ok=True)
        self._journal.forget_garbage([spool.name for _, spool in finished])
        return [None] * len(finished)

    def _finished(self, file: OutboxFile, stored: bool) -> None:
        log.info("event=upload-done did=%s dataset=%s bytes=%d transferred=%s", file.did, file.dataset,
                 file.size, stored)
        file.state, file.error, file.removed = FileState.DONE, "", True
        self.uploaded += 1
        self._files.discard(file)
        self._catalogue.invalidate(file.did)
        self._catalogue.invalidate_collection(DID(file.scope, file.dataset))
        for listener in self._listeners:
            listener(file)

    # -- uploads while writing -------------------------------------------------------------------

    def start_early(self, file: OutboxFile) -> None:
        """Start sending ``file`` while it is written sequentially (see ``upload_while_writing``)."""
        if self._uploads is None:
            return
        file.early = EarlyUpload(GrowingSpool(file.spool))
        file.early.body.grown(file.size)
        self._uploads.start_soon(self._upload_early, file, file.early)

    async def _upload_early(self, file: OutboxFile, early: EarlyUpload) -> None:
        """Send a file's bytes while it is still written, if a transfer slot is free now and it is
        not the last one. It only puts bytes at the URL: :meth:`_attempt` uses them once the file is
        committed and closed with exactly those bytes, else it stores the file as usual. A kill
        meanwhile leaves at most a partial object at the PFN, registered nowhere."""
        try:
            # a slow writer may hold its slot for long: never take the last one, so that files already
            # closed keep moving
            if self._transfer_slots.value < 2:
                return
            async with self._transfer_slots:
                # size 0: a DID of this name that exists already is a conflict here, and the usual
                # upload after close() tells whether it holds the same bytes
                job = UploadJob(file.scope, file.dataset, file.name, file.spool.path, 0, "")
                url = await self._locator.submit(job)
                if url is not None:
                    log.info("event=upload-early-start did=%s bytes_so_far=%d", file.did, file.size)
                    sent, adler32 = await trio.to_thread.run_sync(self._uploader.store_stream, url, early.body,
                                                                  abandon_on_cancel=True)
                    early.stored = (url, sent, adler32)
                    self._hooks.reached("upload-streamed")
        except (DatalakeError, StreamAbandonedError) as exc:
            log.info("event=upload-early-abandoned did=%s reason=%s", file.did, exc)
        except Exception:  # the usual upload after close() still happens: never take the mount down
            log.exception("event=upload-early-error did=%s", file.did)
        finally:
            early.body.abandon()  # wakes a transfer thread that was left behind by a cancellation
            early.body.close()
            early.done.set()
