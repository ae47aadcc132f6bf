"""The outbox service over a fake uploader: commit, upload, retries, failures, cancel, resume."""

from __future__ import annotations

import sqlite3
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pytest
import trio

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.catalogue.fake import FakeCatalogue
from datalakefs.catalogue.rucio_upload import check_did_name
from datalakefs.catalogue.upload import Registration, SpoolChangedError, UploadConflictError, UploadJob
from datalakefs.config import Config
from datalakefs.errors import (
    AlreadyExistsError,
    BusyError,
    CatalogueUnavailableError,
    DatalakeError,
    InvalidNameError,
    NotEmptyError,
    NotFoundError,
    SpoolFullError,
)
from datalakefs.outbox.files import OutboxFile
from datalakefs.outbox.journal import FileState, Intent, Journal, JournalInUseError
from datalakefs.outbox.service import Outbox


def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


class FakeUploader:
    """Stores uploads in a dict; can fail the next calls or hold them until released."""

    def __init__(self) -> None:
        self.lake: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.failures: list[DatalakeError] = []
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0
        self.stored: dict[str, bytes] = {}
        self.located: list[int] = []  # files per locate call
        self.registered: list[int] = []  # files per register call
        self.registering = threading.Event()  # set once a register call has begun
        self.register_gate = threading.Event()  # cleared: register calls wait (a slow catalogue)
        self.register_gate.set()
        self.stores = 0  # store() calls: files sent after their close()
        self.streams = 0  # store_stream() calls begun: files sent while they are written
        self.mismatches: list[str] = []  # stores whose bytes were not the committed ones

    def check_name(self, name: str) -> None:
        check_did_name(name)

    def locate(self, jobs: Sequence[UploadJob]) -> list[str | Exception | None]:
        self.calls += len(jobs)
        self.located.append(len(jobs))
        if self.failures:
            raise self.failures.pop(0)
        return [self._located(job) for job in jobs]

    def _located(self, job: UploadJob) -> str | Exception | None:
        existing = self.lake.get((job.scope, job.name))
        if existing is None:
            return f"fake://{job.scope}/{job.name}"
        if existing[1] != job.path.read_bytes():
            return UploadConflictError(f"{job.scope}:{job.name} exists with other content")
        return None

    def store(self, job: UploadJob, url: str) -> None:
        self.gate.wait(30)
        data = job.path.read_bytes()
        if (len(data), _adler(data)) != (job.size, job.adler32):
            # recorded, not asserted: an exception here would be a retried upload, not a failed test
            self.mismatches.append(f"{job.name}: {len(data)} bytes {_adler(data)}, job {job.size} {job.adler32}")
            raise SpoolChangedError(f"{job.name} changed")
        self.stored[url] = data
        self.stores += 1

    def store_stream(self, url: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        self.streams += 1
        data = b"".join(chunks)
        self.stored[url] = data
        return len(data), _adler(data)

    def register(self, registrations: Sequence[Registration]) -> list[Exception | None]:
        self.registered.append(len(registrations))
        self.registering.set()
        self.register_gate.wait(30)
        for registration in registrations:
            job = registration.job
            if registration.stored:
                self.lake[(job.scope, job.name)] = (job.dataset, self.stored.pop(f"fake://{job.scope}/{job.name}"))
        return [None] * len(registrations)


@pytest.fixture
def catalogue() -> CachedCatalogue:
    fake = FakeCatalogue()
    fake.add_scope("user.x")
    return CachedCatalogue(fake, Config())


@pytest.fixture
def uploader() -> Iterator[FakeUploader]:
    fake = FakeUploader()
    yield fake
    assert fake.mismatches == [], "the outbox sent bytes that were not the committed ones"


@pytest.fixture
def make(tmp_path: Path, catalogue: CachedCatalogue, uploader: FakeUploader) -> Callable[..., Outbox]:
    def build(**options: int) -> Outbox:
        return Outbox(Journal(tmp_path / "journal.sqlite"), uploader, catalogue, tmp_path / "spool",
                      **{"concurrency": 2, **options})
    return build


@pytest.fixture
async def running(make: Callable[..., Outbox]) -> AsyncIterator[Outbox]:
    outbox = make()
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        yield outbox
        nursery.cancel_scope.cancel()


async def _write(outbox: Outbox, name: str, data: bytes, dataset: str = "ds") -> OutboxFile:
    if not outbox.has_dataset("user.x", dataset):
        await outbox.make_dataset("user.x", dataset)
    file = outbox.create("user.x", dataset, name)
    await outbox.open_for_writing(file)
    await outbox.write(file, 0, data)
    await outbox.commit(file)
    await outbox.close_for_writing(file)
    return file


async def _until(condition: Callable[[], bool]) -> None:
    """Poll: the states under test change in worker threads and in the uploader's tasks."""
    with trio.fail_after(20):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_a_closed_file_is_uploaded_and_leaves_the_outbox(running: Outbox, uploader: FakeUploader) -> None:
    left: list[OutboxFile] = []
    running.add_listener(left.append)
    file = await _write(running, "a.dat", b"hello")
    await _until(lambda: bool(left))
    assert left == [file] and file.describe() == "done"
    assert uploader.lake[("user.x", "a.dat")] == ("ds", b"hello")
    assert running.files("user.x", "ds") == [] and not file.spool.path.exists()
    assert running.summary()["uploaded"] == 1


async def test_no_upload_while_a_writer_has_it_open(running: Outbox, uploader: FakeUploader) -> None:
    await running.make_dataset("user.x", "ds")
    file = running.create("user.x", "ds", "b.dat")
    await running.open_for_writing(file)
    await running.write(file, 0, b"part one")
    await running.commit(file)  # fsync: durable and queued, but still open
    assert file.state is FileState.QUEUED
    await _write(running, "probe.dat", b"closed after b.dat was committed")
    await _until(lambda: ("user.x", "probe.dat") in uploader.lake)
    assert uploader.calls == 1  # the probe was located, b.dat (queued before it) was not
    await running.write(file, 8, b", part two")
    await running.commit(file)
    await running.close_for_writing(file)
    await _until(lambda: ("user.x", "b.dat") in uploader.lake)
    assert uploader.lake[("user.x", "b.dat")][1] == b"part one, part two"


async def test_random_writes_get_their_checksum_computed(running: Outbox, uploader: FakeUploader) -> None:
    await running.make_dataset("user.x", "ds")
    file = running.create("user.x", "ds", "c.dat")
    await running.open_for_writing(file)
    await running.write(file, 100, b"tail")
    await running.write(file, 0, b"head")
    await running.truncate(file, 50)
    await running.commit(file)
    await running.close_for_writing(file)
    await _until(lambda: ("user.x", "c.dat") in uploader.lake)
    assert uploader.lake[("user.x", "c.dat")][1] == b"head" + b"\0" * 46


async def test_a_transient_failure_is_retried_with_the_reason_visible(running: Outbox, uploader: FakeUploader) -> None:
    uploader.failures.append(CatalogueUnavailableError("rucio server down"))
    file = await _write(running, "d.dat", b"x")
    await _until(lambda: file.error != "")
    assert file.describe() == "queued (attempt 2 after: rucio server down)"
    await _until(lambda: ("user.x", "d.dat") in uploader.lake)


async def test_a_conflict_fails_visibly_until_retried(running: Outbox, uploader: FakeUploader) -> None:
    uploader.lake[("user.x", "e.dat")] = ("other", b"theirs")
    file = await _write(running, "e.dat", b"ours")
    await _until(lambda: file.state is FileState.FAILED)
    assert file.describe().startswith("failed: user.x:e.dat exists")
    assert running.summary()["failed"] == 1
    del uploader.lake[("user.x", "e.dat")]
    await running.retry(file)
    await _until(lambda: ("user.x", "e.dat") in uploader.lake)


async def test_cancel_drops_the_intent_and_the_bytes(running: Outbox, uploader: FakeUploader) -> None:
    uploader.failures.extend([CatalogueUnavailableError("down")] * 3)
    file = await _write(running, "f.dat", b"x")
    await _until(lambda: file.error != "")
    await running.cancel(file)
    assert not file.spool.path.exists() and running.listing() == []
    uploader.failures.pop()  # one failure left: the probe retries once, 1 s after f.dat would have
    await _write(running, "probe.dat", b"y")
    await _until(lambda: ("user.x", "probe.dat") in uploader.lake)
    assert ("user.x", "f.dat") not in uploader.lake


async def test_busy_while_uploading(running: Outbox, uploader: FakeUploader) -> None:
    uploader.gate.clear()
    file = await _write(running, "g.dat", b"x")
    await _until(lambda: file.state is FileState.UPLOADING)
    with pytest.raises(BusyError):
        await running.open_for_writing(file)
    with pytest.raises(BusyError):
        await running.cancel(file)
    uploader.gate.set()
    await _until(lambda: file.state is FileState.DONE)


async def test_files_ready_together_share_their_catalogue_calls(
    make: Callable[..., Outbox], uploader: FakeUploader
) -> None:
    uploader.register_gate.clear()  # the first registration waits until every transfer is done
    outbox = make()
    for n in range(30):
        await _write(outbox, f"batch{n}.dat", f"payload {n}".encode())
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        await _until(lambda: uploader.registering.is_set() and uploader.stores == 30)
        uploader.register_gate.set()
        await _until(lambda: outbox.pending() == 0)
        nursery.cancel_scope.cancel()
    assert len(uploader.lake) == 30 and sum(uploader.located) == sum(uploader.registered) == 30
    # the files stored while the first registration was under way share the next one
    assert len(uploader.located) <= 3 and len(uploader.registered) <= 2


async def test_a_file_changed_while_waiting_for_a_transfer_slot_uploads_its_new_bytes(
    running: Outbox, uploader: FakeUploader
) -> None:
    uploader.gate.clear()  # both transfer slots (concurrency=2) stay busy
    busy = [await _write(running, f"slot{n}.dat", b"x") for n in range(2)]
    await _until(lambda: all(f.state is FileState.UPLOADING for f in busy))
    rewritten = await _write(running, "rewritten.dat", b"old bytes")
    cancelled = await _write(running, "cancelled.dat", b"unwanted")
    await _until(lambda: sum(uploader.located) == 4)  # located, and waiting for a slot
    assert rewritten.state is cancelled.state is FileState.QUEUED
    await running.open_for_writing(rewritten)
    await running.write(rewritten, 0, b"new bytes")
    await running.commit(rewritten)
    await running.close_for_writing(rewritten)
    await running.cancel(cancelled)
    uploader.gate.set()
    await _until(lambda: running.pending() == 0)
    assert uploader.lake[("user.x", "rewritten.dat")] == ("ds", b"new bytes")
    assert ("user.x", "cancelled.dat") not in uploader.lake


async def test_a_restart_resumes_committed_files_and_forgets_the_rest(
    make: Callable[..., Outbox], uploader: FakeUploader, tmp_path: Path
) -> None:
    first = make()
    await _write(first, "h.dat", b"committed")
    unfinished = first.create("user.x", "ds", "i.dat")
    await first.open_for_writing(unfinished)
    await first.write(unfinished, 0, b"never closed")
    with pytest.raises(JournalInUseError):
        make()  # a second daemon for the same mount point is refused while the first lives
    first.close()  # the process dies here: a new service over the same journal and spool
    second = make()
    assert [f["name"] for f in second.listing()] == ["h.dat"]
    assert not unfinished.spool.path.exists()
    assert second.datasets("user.x") == ["ds"]
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        await _until(lambda: ("user.x", "h.dat") in uploader.lake)
        nursery.cancel_scope.cancel()
    assert ("user.x", "i.dat") not in uploader.lake


async def test_names_scopes_and_directories(running: Outbox, uploader: FakeUploader) -> None:
    uploader.gate.clear()  # j.dat stays in the outbox until the name checks below are done
    with pytest.raises(NotFoundError):
        await running.make_dataset("no.such.scope", "ds")
    with pytest.raises(InvalidNameError):
        await running.make_dataset("user.x", "bad name")
    await _write(running, "j.dat", b"x", dataset="ds1")
    await running.make_dataset("user.x", "ds2")
    with pytest.raises(AlreadyExistsError):
        await running.make_dataset("user.x", "ds2")
    for bad in ("a b", "x" * 251, "." + "x" * 255):
        with pytest.raises(InvalidNameError):
            running.create("user.x", "ds2", bad)
    with pytest.raises(AlreadyExistsError):
        running.create("user.x", "ds2", "j.dat")  # one DID, one outbox file
    uploader.gate.set()
    await _until(lambda: running.files("user.x", "ds1") == [])
    await running.remove_dataset("user.x", "ds1")
    running.create("user.x", "ds2", "k.dat")
    with pytest.raises(NotEmptyError):
        await running.remove_dataset("user.x", "ds2")


async def test_closes_at_the_same_time_share_one_journal_commit_and_fail_alone(
    make: Callable[..., Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: the files closed together get one journal transaction; a spool file whose fsync
    fails (a full disk) fails only its own close(), and its intent is not recorded."""
    outbox = make()  # no uploader running: the commits stay queued
    await outbox.make_dataset("user.x", "ds")
    files = [outbox.create("user.x", "ds", f"g{n}.dat") for n in range(5)]
    for file in files:
        await outbox.open_for_writing(file)
        await outbox.write(file, 0, file.name.encode())
    broken = files[2].spool
    monkeypatch.setattr(broken, "sync", lambda: (_ for _ in ()).throw(SpoolFullError("spool disk full")))
    transactions: list[int] = []
    commit = outbox._journal.commit
    monkeypatch.setattr(outbox._journal, "commit", lambda intents: transactions.append(len(intents)) or commit(intents))
    failed: list[str] = []

    async def close(file: OutboxFile) -> None:
        try:
            await outbox.commit(file)
        except SpoolFullError:
            failed.append(file.name)

    async with trio.open_nursery() as nursery:
        for file in files:
            nursery.start_soon(close, file)
    assert failed == ["g2.dat"]
    assert sum(transactions) == 4 and len(transactions) <= 2  # the first close alone, then the rest
    assert sorted(f["name"] for f in outbox.listing() if f["state"] == "queued") == ["g0.dat", "g1.dat", "g3.dat",
                                                                                      "g4.dat"]
    assert sorted(r.name for r in outbox._journal.uploads()) == ["g0.dat", "g1.dat", "g3.dat", "g4.dat"]
    outbox.close()


@pytest.fixture
async def early(make: Callable[..., Outbox]) -> AsyncIterator[Outbox]:
    """An outbox that starts uploading a sequentially written file once it holds 8 bytes."""
    outbox = make(upload_while_writing=8)
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        yield outbox
        nursery.cancel_scope.cancel()


async def _open_new(outbox: Outbox, name: str) -> OutboxFile:
    if not outbox.has_dataset("user.x", "ds"):
        await outbox.make_dataset("user.x", "ds")
    file = outbox.create("user.x", "ds", name)
    await outbox.open_for_writing(file)
    return file


async def test_a_file_written_sequentially_is_sent_while_it_is_written(early: Outbox, uploader: FakeUploader) -> None:
    file = await _open_new(early, "s.dat")
    await early.write(file, 0, b"0123456789")  # past the threshold: the transfer starts
    await _until(lambda: uploader.streams == 1)
    await early.write(file, 10, b"abcdef")
    await early.commit(file)
    await early.close_for_writing(file)
    await _until(lambda: ("user.x", "s.dat") in uploader.lake)
    assert uploader.lake[("user.x", "s.dat")] == ("ds", b"0123456789abcdef")
    assert uploader.stores == 0 and early.summary()["uploaded_while_writing"] == 1


@pytest.mark.parametrize("change", ["overwrite", "truncate", "second writer"])
async def test_a_file_that_stops_being_sequential_is_sent_again_after_close(
    early: Outbox, uploader: FakeUploader, change: str
) -> None:
    file = await _open_new(early, "r.dat")
    await early.write(file, 0, b"0123456789")
    await _until(lambda: uploader.streams == 1)
    if change == "overwrite":
        await early.write(file, 2, b"XY")
        expected = b"01XY456789"
    elif change == "truncate":
        await early.truncate(file, 4)
        expected = b"0123"
    else:
        await early.open_for_writing(file)
        await early.write(file, 10, b"!")
        await early.close_for_writing(file)
        expected = b"0123456789!"
    await early.commit(file)
    await early.close_for_writing(file)
    await _until(lambda: ("user.x", "r.dat") in uploader.lake)
    assert uploader.lake[("user.x", "r.dat")] == ("ds", expected)
    assert uploader.stores == 1 and early.summary()["uploaded_while_writing"] == 0


async def test_a_file_removed_while_it_is_sent_is_not_uploaded(early: Outbox, uploader: FakeUploader) -> None:
    file = await _open_new(early, "x.dat")
    await early.write(file, 0, b"0123456789")
    await _until(lambda: uploader.streams == 1)
    await early.cancel(file)
    await early.close_for_writing(file)
    assert file.early is not None
    with trio.fail_after(5):
        await file.early.done.wait()
    assert file.early.stored is None
    assert ("user.x", "x.dat") not in uploader.lake and early.pending() == 0


async def test_the_last_transfer_slot_is_never_taken_while_writing(
    make: Callable[..., Outbox], uploader: FakeUploader
) -> None:
    outbox = make(upload_while_writing=8, concurrency=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        file = await _open_new(outbox, "one.dat")
        await outbox.write(file, 0, b"0123456789")
        await outbox.commit(file)
        await outbox.close_for_writing(file)
        await _until(lambda: ("user.x", "one.dat") in uploader.lake)
        nursery.cancel_scope.cancel()
    assert uploader.stores == 1 and outbox.summary()["uploaded_while_writing"] == 0


# -- versions, restarts and races -------------------------------------------------------------------


async def _rewrite(outbox: Outbox, file: OutboxFile, data: bytes, *, truncate: bool = True, offset: int = 0,
                   commit: bool = True) -> None:
    await outbox.open_for_writing(file, truncate=truncate)
    await outbox.write(file, offset, data)
    if commit:
        await outbox.commit(file)
        await outbox.close_for_writing(file)


async def test_o_trunc_and_a_rewrite_of_a_queued_file_replace_it(
    make: Callable[..., Outbox], uploader: FakeUploader
) -> None:
    outbox = make()
    file = await _write(outbox, "t.dat", b"0123456789" * 1000)
    first = file.committed
    await _rewrite(outbox, file, b"hi\n")
    assert outbox.read(file, 0, 100) == b"hi\n" and file.committed is not first
    assert file.committed is not None and not first.spool.path.exists()  # the version it replaced is gone
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        await _until(lambda: outbox.pending() == 0)
        nursery.cancel_scope.cancel()
    assert uploader.lake[("user.x", "t.dat")] == ("ds", b"hi\n")


async def test_a_kill_during_a_rewrite_uploads_the_committed_version(
    make: Callable[..., Outbox], uploader: FakeUploader, tmp_path: Path
) -> None:
    """Copy-on-write: the committed bytes are untouched by a rewrite that was never committed; an
    append in place is cut back at the restart."""
    first = make()
    rewritten = await _write(first, "r.dat", b"committed bytes")
    appended = await _write(first, "a.dat", b"committed")
    await _rewrite(first, rewritten, b"XX", truncate=False, commit=False)  # over committed bytes
    await _rewrite(first, appended, b" and more", truncate=False, offset=9, commit=False)  # in place
    assert first.read(appended, 0, 100) == b"committed and more"
    first.close()  # killed here
    second = make()
    assert sorted(p.suffix for p in (tmp_path / "spool").iterdir()) == [".spool", ".spool"]  # the draft went
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        await _until(lambda: second.pending() == 0)
        nursery.cancel_scope.cancel()
    assert uploader.lake[("user.x", "r.dat")] == ("ds", b"committed bytes")
    assert uploader.lake[("user.x", "a.dat")] == ("ds", b"committed")


async def test_a_spool_file_that_differs_from_its_commit_is_never_uploaded(
    make: Callable[..., Outbox], uploader: FakeUploader
) -> None:
    first = make()
    file = await _write(first, "c.dat", b"what was acknowledged")
    path = file.spool.path
    first.close()
    path.write_bytes(b"what was acknowledgeX")  # same size, other bytes
    second = make()
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        resumed = second.file("user.x", "ds", "c.dat")
        await _until(lambda: resumed.state is FileState.FAILED)
        nursery.cancel_scope.cancel()
    assert "not the 21 bytes" in resumed.describe() and "not uploaded" in resumed.describe()
    assert ("user.x", "c.dat") not in uploader.lake and uploader.stores == 0


async def test_startup_deletes_only_what_its_journal_owns(make: Callable[..., Outbox], tmp_path: Path) -> None:
    first = make()
    await _write(first, "kept.dat", b"x")
    draft = first.create("user.x", "ds", "never-closed.dat")
    first.close()
    spool = tmp_path / "spool"
    foreign = spool / "someone-elses.draft"
    foreign.write_bytes(b"not ours")
    outside = tmp_path / "outside.draft"
    outside.write_bytes(b"the target of a symlink")
    (spool / f"{draft.spool.path.stem}-link.draft").symlink_to(outside)
    lost = spool / f"{first._journal.id}-0123.spool"  # ours, but no row: a journal that lost its tail
    lost.write_bytes(b"maybe acknowledged")
    second = make()
    assert [f["name"] for f in second.listing()] == ["kept.dat"]
    assert not draft.spool.path.exists()
    assert foreign.exists() and outside.exists() and lost.exists()
    assert (spool / f"{draft.spool.path.stem}-link.draft").is_symlink()


async def test_rm_while_the_uploader_picks_the_file_cancels_it(
    running: Outbox, uploader: FakeUploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uploader reaches its transfer slot while `rm` is removing the file's intent from the
    journal: the upload must not start (it did, and then a KeyError took the mount down)."""
    located, release_locate = threading.Event(), threading.Event()
    removing, release_remove = threading.Event(), threading.Event()
    locate, remove = uploader.locate, running._journal.remove

    def slow_locate(jobs: Sequence[UploadJob]) -> list[str | Exception | None]:
        located.set()
        release_locate.wait(10)
        return locate(jobs)

    def slow_remove(upload_ids: Sequence[int]) -> None:
        removing.set()
        release_remove.wait(10)
        remove(upload_ids)

    running.uploads._locator.call = slow_locate  # type: ignore[assignment]
    monkeypatch.setattr(running._journal, "remove", slow_remove)
    uploader.gate.clear()  # a transfer that starts waits here, visibly "uploading"
    file = await _write(running, "rm.dat", b"unwanted")
    await trio.to_thread.run_sync(located.wait, 10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(running.cancel, file)
        await trio.to_thread.run_sync(removing.wait, 10)
        release_locate.set()
        await _until(lambda: file not in running.uploads._pipeline)  # the attempt is over
        assert file.state is not FileState.UPLOADING
        release_remove.set()
    uploader.gate.set()
    assert file.removed and running.listing() == [] and uploader.stored == {}
    running.uploads._locator.call = locate  # type: ignore[assignment]
    await _write(running, "after.dat", b"the mount still works")
    await _until(lambda: ("user.x", "after.dat") in uploader.lake)
    assert ("user.x", "rm.dat") not in uploader.lake


@pytest.mark.parametrize("error", [SpoolFullError("outbox journal: database or disk is full"),
                                   sqlite3.OperationalError("disk I/O error")])
async def test_a_journal_that_cannot_be_written_never_takes_the_mount_down(
    running: Outbox, uploader: FakeUploader, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Outside any request: a full disk is retried with the reason visible; any other journal error
    fails the file with its reason. The uploader keeps running either way."""
    set_state = running._journal.set_state

    def broken(upload_id: int, state: FileState, error_text: str = "") -> None:
        if state is FileState.UPLOADING:
            raise error
        set_state(upload_id, state, error_text)

    monkeypatch.setattr(running._journal, "set_state", broken)
    file = await _write(running, "j.dat", b"x")
    await _until(lambda: str(error) in file.describe())
    assert file.describe().startswith("queued (attempt" if isinstance(error, SpoolFullError) else "failed:")
    monkeypatch.setattr(running._journal, "set_state", set_state)
    await running.retry(file)
    await _until(lambda: ("user.x", "j.dat") in uploader.lake)


async def test_rename_moves_the_intent_and_replaces_the_target(
    make: Callable[..., Outbox], uploader: FakeUploader
) -> None:
    first = make()
    await _write(first, "target.dat", b"replaced")
    temporary = await _write(first, ".target.dat.tmp", b"final bytes")
    assert temporary.describe().startswith("kept: a temporary name")
    with pytest.raises(AlreadyExistsError):
        await first.rename(temporary, "target.dat", replace=False)
    await first.rename(temporary, "target.dat")
    assert [f["name"] for f in first.listing()] == ["target.dat"]
    first.close()
    second = make()  # the rename survives a restart
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        await _until(lambda: second.pending() == 0)
        nursery.cancel_scope.cancel()
    assert uploader.lake == {("user.x", "target.dat"): ("ds", b"final bytes")}


async def test_writes_after_the_last_flush_are_committed_at_release(running: Outbox, uploader: FakeUploader) -> None:
    await running.make_dataset("user.x", "ds")
    file = running.create("user.x", "ds", "m.dat")
    await running.open_for_writing(file)
    await running.write(file, 0, b"\0\0\0\0")
    await running.commit(file)  # close(fd) of an mmap'ed file
    await running.write(file, 0, b"page")  # the mapping's pages, at munmap
    await running.close_for_writing(file)
    await _until(lambda: ("user.x", "m.dat") in uploader.lake)
    assert uploader.lake[("user.x", "m.dat")] == ("ds", b"page")


async def test_a_truncate_of_a_path_that_cannot_be_committed_changes_nothing(
    make: Callable[..., Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """truncate(2) with no writer commits at once; when that fails (disk full) the file keeps the
    version of its last close(), marked failed with the reason, instead of waiting for ever."""
    outbox = make()
    file = await _write(outbox, "t.dat", b"0123456789")
    monkeypatch.setattr(outbox._journal, "commit", lambda intents: (_ for _ in ()).throw(SpoolFullError("full")))
    with pytest.raises(SpoolFullError):
        await outbox.truncate(file, 3)
    assert outbox.read(file, 0, 100) == b"0123456789" and not file.dirty
    assert file.describe().startswith("failed: the changes after its last close() could not be saved (full)")


async def test_a_rename_while_the_uploader_locates_the_file_uploads_the_new_name(
    running: Outbox, uploader: FakeUploader
) -> None:
    located, release = threading.Event(), threading.Event()
    locate = uploader.locate

    def slow_locate(jobs: Sequence[UploadJob]) -> list[str | Exception | None]:
        located.set()
        release.wait(10)
        return locate(jobs)

    running.uploads._locator.call = slow_locate  # type: ignore[assignment]
    file = await _write(running, ".out.tmp1", b"x")  # temporary: never located
    await running.rename(file, "old.dat")
    await trio.to_thread.run_sync(located.wait, 10)
    await running.rename(file, "new.dat")  # while the uploader asks where old.dat goes
    release.set()
    await _until(lambda: running.pending() == 0)
    assert uploader.lake == {("user.x", "new.dat"): ("ds", b"x")}


async def test_a_row_of_an_earlier_version_without_its_checksum_is_uploaded(
    make: Callable[..., Outbox], uploader: FakeUploader, tmp_path: Path
) -> None:
    """Earlier versions committed files written out of order without their adler32: such a row is
    checked by size, and takes the checksum of its bytes."""
    journal = Journal(tmp_path / "journal.sqlite")
    journal.add_dataset("user.x", "ds")
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "0123abcd.spool").write_bytes(b"legacy")
    journal.commit([Intent("user.x", "ds", "old.dat", "0123abcd.spool", 6, "")])
    journal.close()
    outbox = make()
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        await _until(lambda: outbox.pending() == 0)
        nursery.cancel_scope.cancel()
    assert uploader.lake[("user.x", "old.dat")] == ("ds", b"legacy")
