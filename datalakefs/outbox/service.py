"""The outbox service: the files being written, their durable upload intents, and their uploader.

Life of an outbox file (SPEC §5; the rules are docs/SEMANTICS.md's table)::

    create ──► writing ──close()/fsync()──► queued ──► uploading ──► done (leaves the outbox)
                  ▲                           │  ▲          │
                  └────── changed again ──────┘  └─ retry ◄─┴──► failed: reason (stays visible)

* What is uploaded is the content at the last successful ``close()`` or ``fsync()``
  (:meth:`Outbox.commit`: fsync of the spool file, then a journal commit with its size and adler32).
  Only then does the call return success. Writes after that go to the file's bytes, never into the
  committed version (outbox/files.py), until the next commit replaces it; the last release of a
  file commits what was written after its last ``close()`` (``mmap`` writes reach the daemon only
  when the mapping goes).
* ``O_TRUNC``, ``truncate`` and ``ftruncate`` change the size at once; a ``truncate(2)`` of a path
  nobody has open is committed at once.
* ``rename`` within a dataset directory moves the file and its intent (one journal transaction),
  replacing a file of the target name; names starting with ``.`` are temporary: kept, never uploaded.
* ``rm`` (and ``cancel``) of a file that is not ``uploading`` drops it and its intent; the uploader
  never starts a file a request is changing (:attr:`OutboxFile.holds`), and an ``uploading`` file is
  ``EBUSY`` to changes: an upload is either cancelled or completed, never both.
* At start every journal row is queued again (its spool file checked against its size and adler32
  before it is uploaded); only spool files this journal provably owns are deleted (outbox/journal.py).

The uploader is outbox/uploads.py. Everything here runs on the trio thread; fsyncs, journal commits,
copies and checksums run in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.catalogue.upload import TransitionHooks, Uploader
from datalakefs.errors import (
    AlreadyExistsError,
    BusyError,
    DatalakeError,
    InvalidNameError,
    NotEmptyError,
    NotFoundError,
)
from datalakefs.outbox.batcher import Batcher
from datalakefs.outbox.files import TEMPORARY_PREFIX, Committed, FileTable, OutboxFile
from datalakefs.outbox.journal import FileState, Intent, Journal, Record
from datalakefs.outbox.spool import DRAFT, SpoolFile, file_adler32, sync_directory
from datalakefs.outbox.uploads import BATCH_LIMIT, UploadListener, UploadPipeline

log = logging.getLogger(__name__)

_NAME_MAX = 255


@dataclass(frozen=True, slots=True)
class _Commit:
    """One file of a group commit: its bytes, and the checksum when it was kept while writing."""

    intent: Intent
    spool: SpoolFile
    adler32: str | None
    superseded: SpoolFile | None


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
        hooks: TransitionHooks | None = None,
    ) -> None:
        self._journal = journal
        self._uploader = uploader
        self._catalogue = catalogue
        self._spool_dir = spool_dir
        self._reserve = reserve
        self._early_after = upload_while_writing
        self._hooks = hooks or TransitionHooks()
        self._files = FileTable()
        self._datasets: set[tuple[str, str]] = set(journal.datasets())
        self.uploads = UploadPipeline(journal, uploader, catalogue, self._files, self._hooks, concurrency=concurrency)
        self._committer: Batcher[_Commit, tuple[int, str]] = Batcher(self._commit_group, BATCH_LIMIT)
        self._resume()

    # -- start and end -----------------------------------------------------------------------------

    def _resume(self) -> None:
        """Queue every journal row again; delete the spool files this journal provably owns and no
        longer needs (garbage it recorded, drafts it never committed), following no symlink."""
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        owned = f"{self._journal.id}-"
        garbage = self._journal.garbage()
        for name in garbage:
            if name.startswith(owned):
                _unlink_regular(self._spool_dir / name)
        self._journal.forget_garbage(garbage)
        records = self._journal.uploads()
        for record in records:
            self._files.add(self._resumed(record))
            self._datasets.add((record.scope, record.dataset))
        committed = {record.spool for record in records}
        with os.scandir(self._spool_dir) as entries:
            for entry in entries:
                if not entry.name.startswith(owned) or not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name.endswith(DRAFT):
                    log.info("event=outbox-orphan-removed spool=%s reason=never-committed", entry.name)
                    _unlink_regular(Path(entry.path))
                elif entry.name not in committed:
                    log.warning("event=outbox-spool-unknown spool=%s reason=not-in-the-journal action=kept",
                                entry.name)
        if records:
            log.info("event=outbox-resume uploads=%d", len(records))

    def _resumed(self, record: Record) -> OutboxFile:
        """The file of a journal row after a restart. Bytes appended after its last commit are cut
        off; a spool file shorter than its commit (or missing) fails it; its checksum is checked
        before its upload (:class:`UploadPipeline`)."""
        path = self._spool_dir / record.spool
        size, problem = -1, ""
        try:
            if not _is_regular(path) and _is_regular(path.with_suffix(DRAFT)):
                os.rename(path.with_suffix(DRAFT), path)  # killed between its commit and its publication
            if _is_regular(path):
                size = os.lstat(path).st_size
                if size > record.size:
                    os.truncate(path, record.size)
                    size = record.size
        except OSError as exc:
            problem = f"spool file {record.spool} unusable: {exc.strerror or exc}"
        if size < record.size and not problem:
            problem = (f"spool file {record.spool} is missing or shorter ({max(size, 0)} bytes) than its last "
                       f"close() ({record.size} bytes): not uploaded")
        spool = SpoolFile(path, self._reserve, max(size, 0))
        file = OutboxFile(record.scope, record.dataset, record.name, spool, state=record.state, error=record.error,
                          attempts=record.attempts, mtime=record.updated)
        file.committed = Committed(record.id, spool, record.size, record.adler32, verified=False)
        file.committed_changes = file.changes
        if problem:
            log.warning("event=outbox-spool-bad did=%s:%s reason=%s", record.scope, record.name, problem)
            file.state, file.error = FileState.FAILED, problem
        return file

    def close(self) -> None:
        """Release the journal (the daemon is ending; in-flight uploads resume at the next start)."""
        self._journal.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The uploader (outbox/uploads.py), until cancelled."""
        await self.uploads.run(task_status=task_status)

    def add_listener(self, listener: UploadListener) -> None:
        self.uploads.add_listener(listener)

    # -- the tree ----------------------------------------------------------------------------------

    def scopes(self) -> list[str]:
        return sorted({scope for scope, _ in self._datasets})

    def datasets(self, scope: str) -> list[str]:
        return sorted(dataset for s, dataset in self._datasets if s == scope)

    def has_dataset(self, scope: str, dataset: str) -> bool:
        return (scope, dataset) in self._datasets

    def files(self, scope: str, dataset: str) -> list[OutboxFile]:
        return sorted((f for f in self._files if f.scope == scope and f.dataset == dataset), key=lambda f: f.name)

    def file(self, scope: str, dataset: str, name: str) -> OutboxFile:
        found = self._files.get(scope, name)
        if found is None or found.dataset != dataset:
            raise NotFoundError(f".outbox/{scope}/{dataset}/{name}")
        return found

    def file_by_serial(self, serial: int) -> OutboxFile:
        found = self._files.by_serial(serial)
        if found is None:
            raise NotFoundError(f"outbox file #{serial} is gone")
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

    def check_name(self, name: str) -> None:
        """A valid DID name, or a temporary one (``.`` first: never uploaded under that name)."""
        if name.startswith(TEMPORARY_PREFIX):
            if name in (".", "..") or len(os.fsencode(name)) > _NAME_MAX:
                raise InvalidNameError(f"{name!r} is not a valid file name")
        else:
            self._uploader.check_name(name)

    def create(self, scope: str, dataset: str, name: str) -> OutboxFile:
        """A new, empty file being written (not yet an upload intent)."""
        if (scope, dataset) not in self._datasets:
            raise NotFoundError(f".outbox/{scope}/{dataset}")
        self.check_name(name)
        other = self._files.get(scope, name)
        if other is not None:
            raise AlreadyExistsError(
                f"{scope}:{name} is already waiting in .outbox/{scope}/{other.dataset}: one DID, one file"
            )
        created = OutboxFile(scope, dataset, name, SpoolFile.create(self._spool_dir, self._journal.id, self._reserve))
        self._files.add(created)
        return created

    async def open_for_writing(self, file: OutboxFile, truncate: bool = False) -> None:
        """A writer opens ``file`` (``O_TRUNC``: empty it now)."""
        self._check_changeable(file)
        file.writers += 1
        if file.writers > 1:
            _abandon_early(file)  # two writers: no longer a plain sequential stream
        if truncate:
            try:
                await self.truncate(file, 0)
            except BaseException:
                await self.close_for_writing(file)
                raise

    async def write(self, file: OutboxFile, offset: int, data: bytes) -> int:
        self._check_changeable(file)
        async with file.lock:
            spool = await self._changeable_bytes(file, offset, file.size)
            written = spool.write(offset, data)
        file.mtime = time.time()
        self._follow_write(file, data if written == len(data) else data[:written])
        return written

    async def truncate(self, file: OutboxFile, size: int) -> None:
        """``truncate``/``ftruncate``/``O_TRUNC``; without an open writer (truncate(2) of a path)
        nothing else would commit the change, so it is committed at once."""
        self._check_changeable(file)
        async with file.lock:
            if size != file.size:
                spool = await self._changeable_bytes(file, min(size, file.size), size)
                _abandon_early(file)
                spool.truncate(size)
                file.mtime = time.time()
        if file.writers == 0:
            try:
                await self.commit(file)
            except (OSError, DatalakeError) as exc:
                await self._discard_changes(file, str(exc))
                raise
            finally:
                file.spool.close()

    async def _changeable_bytes(self, file: OutboxFile, lowest: int, keep: int) -> SpoolFile:
        """The spool file to change from byte ``lowest`` on (the caller holds ``file.lock``): the
        file's own while the change leaves its committed bytes as they are, else a new draft with its
        first ``keep`` bytes (outbox/files.py)."""
        self._check_changeable(file)
        file.changes += 1  # from here on it is dirty: the uploader leaves it alone
        committed = file.committed
        if committed is None or file.spool is not committed.spool or lowest >= committed.size:
            return file.spool
        _abandon_early(file)
        length = min(keep, file.size)
        if length:
            draft = await trio.to_thread.run_sync(SpoolFile.copy_of, file.spool, length, self._journal.id)
        else:
            draft = SpoolFile.create(self._spool_dir, self._journal.id, self._reserve)
        if file.removed:  # cancelled while the copy ran
            draft.delete()
        else:
            file.spool = draft
        return file.spool

    def _follow_write(self, file: OutboxFile, written: bytes) -> None:
        """Feed the file's early upload the bytes just ``written``, or abandon it when the write was
        not sequential; start one once a file written sequentially by one writer holds
        ``upload_while_writing`` bytes."""
        sequential = file.spool.sequential
        if file.early is not None:
            if file.early.done.is_set():
                return  # over (abandoned or sent): nothing listens any more
            if sequential:
                file.early.body.grown(file.size, written)
            else:
                file.early.body.abandon()
        elif sequential and self._early_after and file.size >= self._early_after and file.writers == 1:
            self.uploads.start_early(file)

    async def commit(self, file: OutboxFile) -> None:
        """Make the file's current bytes and its upload intent durable (close/fsync). Writes wait
        meanwhile. The closes that arrive together share one directory fsync and one journal
        transaction (:meth:`_commit_group`)."""
        async with file.lock:
            if file.removed or not file.dirty:
                return
            spool, changes = file.spool, file.changes
            previous = file.committed
            superseded = previous.spool if previous is not None and previous.spool is not spool else None
            intent = Intent(file.scope, file.dataset, file.name, spool.name, spool.size, "")
            upload_id, adler32 = await self._committer.submit(_Commit(intent, spool, spool.adler32, superseded))
            spool.rebase(intent.size, adler32)
            file.committed = Committed(upload_id, spool, intent.size, adler32)
            file.committed_changes = changes
            file.state, file.error, file.attempts, file.next_try = FileState.QUEUED, "", 0, 0.0
        self.uploads.wake()

    def _commit_group(self, group: Sequence[_Commit]) -> list[tuple[int, str] | Exception]:
        """Worker thread: fsync each spool file (and checksum those written out of order), then (once)
        their directory; record every intent whose bytes are durable in one journal transaction;
        then publish the drafts and delete the versions they superseded (journal.py's garbage)."""
        failed: dict[int, Exception] = {}
        checksums: dict[int, str] = {}
        for index, member in enumerate(group):
            try:
                member.spool.sync()
                checksums[index] = member.adler32 or file_adler32(member.spool.path)[1]
            except (OSError, DatalakeError) as exc:
                failed[index] = exc
        synced = [index for index in range(len(group)) if index not in failed]
        if any(not group[index].spool.entry_durable for index in synced):
            sync_directory(self._spool_dir)
            for index in synced:
                group[index].spool.entry_durable = True
        intents = [_with_adler32(group[index].intent, checksums[index]) for index in synced]
        ids = dict(zip(synced, self._journal.commit(intents) if intents else [], strict=True))
        self._hooks.reached("commit")
        gone = []
        for index in synced:
            try:
                group[index].spool.publish()
                superseded = group[index].superseded
                if superseded is not None:
                    superseded.delete()
                    gone.append(superseded.name)
            except OSError as exc:  # the restart finishes it (outbox/journal.py's garbage, _resumed)
                log.warning("event=outbox-publish-failed spool=%s reason=%s", group[index].spool.name, exc)
        self._hooks.reached("published")
        if gone:
            self._journal.forget_garbage(gone)
        return [failed[index] if index in failed else (ids[index], checksums[index]) for index in range(len(group))]

    async def close_for_writing(self, file: OutboxFile) -> None:
        """The last release of a writer commits what was written since the last close() (mmap
        writes arrive between the two); when that fails, those changes are dropped and the file
        fails with the reason (the version of its last close() stays)."""
        file.writers -= 1
        if file.writers:
            return
        if file.dirty and not file.removed:
            try:
                await self.commit(file)
            except (OSError, DatalakeError) as exc:
                await self._discard_changes(file, str(exc))
        file.spool.close()
        if file.early is not None and not file.dirty and not file.removed:
            file.early.body.end(file.size)  # committed and closed: the early upload can finish
        else:
            _abandon_early(file)
        if file.removed:
            _delete_spools(file)
        self.uploads.wake()

    async def _discard_changes(self, file: OutboxFile, reason: str) -> None:
        committed = file.committed
        if committed is None:
            log.warning("event=outbox-dropped did=%s reason=%s", file.did, reason)
            self._drop(file)
            return
        if file.spool is not committed.spool:
            file.spool.delete()
            file.spool = committed.spool
        else:
            file.spool.truncate(committed.size)  # what was appended in place since the commit
            file.spool.rebase(committed.size, committed.adler32)
        file.committed_changes = file.changes
        file.state = FileState.FAILED
        file.error = (f"the changes after its last close() could not be saved ({reason}); "
                      "`retry` uploads the version of that close()")
        log.warning("event=outbox-changes-lost did=%s reason=%s", file.did, reason)
        try:
            await trio.to_thread.run_sync(self._journal.set_state, committed.upload_id, FileState.FAILED, file.error)
        except DatalakeError as exc:
            log.warning("event=outbox-journal-error did=%s reason=%s", file.did, exc)

    def read(self, file: OutboxFile, offset: int, size: int) -> bytes:
        return file.spool.read(offset, size)

    @staticmethod
    def _check_changeable(file: OutboxFile) -> None:
        if file.state is FileState.UPLOADING:
            raise BusyError(f"{file.scope}:{file.name} is being uploaded")

    # -- names -------------------------------------------------------------------------------------

    async def rename(self, file: OutboxFile, name: str, *, replace: bool = True) -> None:
        """rename(2) within the file's dataset directory: the file and its upload intent take
        ``name``, replacing a file of that name (one journal transaction)."""
        if name == file.name:
            return
        self.check_name(name)
        target = self._files.get(file.scope, name)
        async with contextlib.AsyncExitStack() as locks:
            for locked in sorted((f for f in (file, target) if f is not None), key=lambda f: f.serial):
                await locks.enter_async_context(locked.lock)
            if file.removed or self._files.get(file.scope, name) is not target:
                raise BusyError(f"{file.scope}:{file.name} changed during the rename: try again")
            self._check_changeable(file)
            if target is not None:
                if not replace:
                    raise AlreadyExistsError(f"{file.scope}:{name} exists")
                if target.dataset != file.dataset:
                    raise AlreadyExistsError(f"{file.scope}:{name} is already waiting in .outbox/{file.scope}/"
                                             f"{target.dataset}: one DID, one file")
                self._check_changeable(target)
            await self._renamed_in_journal(file, target, name)
            if target is not None:
                self._drop(target)
            _abandon_early(file)
            self._files.rename(file, name)
        log.info("event=outbox-renamed did=%s", file.did)
        self.uploads.wake()

    async def _renamed_in_journal(self, file: OutboxFile, target: OutboxFile | None, name: str) -> None:
        """The journal's part of a rename; the uploader leaves both files alone meanwhile."""
        held = [f for f in (file, target) if f is not None]
        for f in held:
            f.holds += 1
        try:
            if file.committed is not None:
                await trio.to_thread.run_sync(self._journal.rename, file.committed.upload_id, file.dataset, name)
            elif target is not None and target.committed is not None:
                await trio.to_thread.run_sync(self._journal.remove, [target.committed.upload_id])
        finally:
            for f in held:
                f.holds -= 1

    # -- control -----------------------------------------------------------------------------------

    async def cancel(self, file: OutboxFile) -> None:
        """``rm`` of an outbox file: a queued, failed or unfinished upload is dropped with its bytes.
        The uploader leaves the file alone while its intent is removed."""
        async with file.lock:
            if file.removed:
                return
            self._check_changeable(file)
            file.holds += 1
            try:
                if file.committed is not None:
                    await trio.to_thread.run_sync(self._journal.remove, [file.committed.upload_id])
            finally:
                file.holds -= 1
            self._drop(file)
        log.info("event=outbox-cancelled did=%s", file.did)

    async def retry(self, file: OutboxFile) -> None:
        """Queue a failed (or backing-off) upload again now."""
        if file.committed is None or file.state is FileState.UPLOADING or file.removed:
            return
        await trio.to_thread.run_sync(self._journal.set_state, file.committed.upload_id, FileState.QUEUED)
        file.state, file.error, file.attempts, file.next_try = FileState.QUEUED, "", 0, 0.0
        self.uploads.wake()

    def _drop(self, file: OutboxFile) -> None:
        file.removed = True
        _abandon_early(file)
        self._files.discard(file)
        if file.writers == 0:
            _delete_spools(file)

    # -- visibility --------------------------------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        return [f.as_dict() for f in sorted(self._files, key=lambda f: (f.scope, f.dataset, f.name))]

    def summary(self) -> dict[str, int]:
        states = (FileState.WRITING, FileState.QUEUED, FileState.UPLOADING, FileState.FAILED)
        counts = dict.fromkeys((state.value for state in states), 0)
        pending_bytes = 0
        for f in self._files:
            counts[f.as_dict()["state"]] += 1
            pending_bytes += f.size
        return {**counts, "pending_bytes": pending_bytes, "uploaded": self.uploads.uploaded,
                "uploaded_while_writing": self.uploads.uploaded_early}

    def pending(self) -> int:
        """Committed uploads that have not finished."""
        return sum(1 for f in self._files if f.committed is not None)


def _with_adler32(intent: Intent, adler32: str) -> Intent:
    return Intent(intent.scope, intent.dataset, intent.name, intent.spool, intent.size, adler32)


def _abandon_early(file: OutboxFile) -> None:
    if file.early is not None:
        file.early.body.abandon()


def _delete_spools(file: OutboxFile) -> None:
    file.spool.delete()
    if file.committed is not None and file.committed.spool is not file.spool:
        file.committed.spool.delete()


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _unlink_regular(path: Path) -> None:
    """Delete ``path`` if it is a regular file (a symlink or anything else is left alone)."""
    if _is_regular(path):
        path.unlink(missing_ok=True)
