"""A directory served while the catalogue's answer still arrives: readdir hands out the entries that
are in, waits (without blocking the loop) for more, shares one answer between readers, and a listing
that breaks off is an error for the reader that reaches the break, never a shorter listing cached."""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.config import Config
from datalakefs.errors import CatalogueUnavailableError, NotFoundError
from datalakefs.fs.attributes import Attributes, Ownership
from datalakefs.fs.filesystem import Filesystem
from datalakefs.fs.lake import LakeTree
from datalakefs.model import DID, DIDInfo, DIDType
from datalakefs.namespace.inodes import ROOT_INODE, InodeTable
from datalakefs.namespace.tree import Entries, Namespace

#: entries per batch of the held catalogue; the namespace hands a listing out beyond TIMES_LIMIT entries
BATCH = 3
TIMES_LIMIT = 2
#: the listings' TTL (catalogue_ttl)
TTL = 60.0


class _HeldCatalogue:
    """A catalogue whose dataset ``s:big`` arrives in batches (of :data:`BATCH` files, or ``sizes``),
    each held back until the test releases it (:meth:`release`), and the end of the answer after the
    last; ``broken_at``: the batch at which the answer breaks off instead (the rows before it delivered)."""

    def __init__(self, files: int = 0, broken_at: int | None = None, sizes: list[int] | None = None) -> None:
        self.sizes = sizes if sizes is not None else [min(BATCH, files - start) for start in range(0, files, BATCH)]
        self.files = [DIDInfo(DID("s", f"f{i:03d}"), DIDType.FILE, size=i) for i in range(sum(self.sizes))]
        self.broken_at = broken_at
        self.batches = len(self.sizes)
        self.released = [trio.Event() for _ in range(self.batches + 1)]
        self.calls = 0
        self.closed = threading.Event()

    def release(self, upto: int) -> None:
        """Let batches ``0 .. upto - 1`` (and the end of the answer, as batch ``batches``) go."""
        for gate in self.released[:upto]:
            gate.set()

    def list_files(self, did: DID) -> Iterator[list[DIDInfo]]:
        self.calls += 1
        try:
            start = 0
            for index, size in enumerate(self.sizes):
                trio.from_thread.run(self.released[index].wait)
                if index == self.broken_at:
                    raise CatalogueUnavailableError("rucio server: connection reset by peer")
                yield self.files[start : start + size]
                start += size
            trio.from_thread.run(self.released[self.batches].wait)
        finally:
            self.closed.set()

    @property
    def names(self) -> list[str]:
        return [info.did.name for info in self.files]

    def get_infos(self, dids: list[DID]) -> list[DIDInfo]:
        return []  # no times: a small listing is used as listed

    def get_info(self, did: DID) -> DIDInfo:
        return DIDInfo(did, DIDType.DATASET)

    def list_scopes(self) -> list[str]:
        return ["s"]


@dataclass
class _Mount:
    fs: Filesystem
    namespace: Namespace
    catalogue: CachedCatalogue
    held: _HeldCatalogue
    dataset: int

    async def read(self, fh: int, start: int, room: int = 1000) -> list[tuple[int, str, int]]:
        """One readdir as the kernel asks it: at most ``room`` entries from ``start``, remembered."""
        entries = [(next_id, name, ino) for next_id, name, ino, _ in await self.fs.readdir(fh, start, _built)]
        entries = entries[:room]
        self.fs.remember_each(ino for _, _, ino in entries)
        return entries

    async def listed(self) -> list[str]:
        """A new opendir of the dataset, read to its end (``ls``)."""
        return await self.read_all(await self.fs.opendir(self.dataset))

    async def read_all(self, fh: int) -> list[str]:
        return [name for name, _ in await self.read_entries(fh)]

    async def read_entries(self, fh: int) -> list[tuple[str, int]]:
        """Every entry (name, inode) from the start, as ``ls`` reads them: until an empty answer."""
        entries: list[tuple[str, int]] = []
        while replied := await self.read(fh, len(entries)):
            entries += [(name, ino) for _, name, ino in replied]
        return entries


def _built(attributes: Attributes) -> Attributes:
    return attributes


class _NoContent:
    """These tests read no file data."""


@asynccontextmanager
async def mounted(held: _HeldCatalogue, clock: Callable[[], float] | None = None) -> AsyncIterator[_Mount]:
    """The filesystem over ``held`` with the catalogue's background running, as in the daemon; its
    caches on ``clock`` when given."""
    timer = clock or trio.current_time
    catalogue = CachedCatalogue(held, Config(catalogue_ttl=TTL), timer=timer)  # type: ignore[arg-type]
    namespace = Namespace(catalogue, InodeTable(), listing_ttl=TTL, times_limit=TIMES_LIMIT, timer=timer)
    lake = LakeTree(namespace, catalogue, _NoContent(), {}, Ownership(1000, 1000))  # type: ignore[arg-type]
    fs = Filesystem(namespace, lake)
    with trio.fail_after(30):  # a reader that waits for ever fails the test instead of hanging it
        async with trio.open_nursery() as nursery:
            await nursery.start(catalogue.run)
            await nursery.start(fs.run)
            scope = (await fs.lookup(ROOT_INODE, "s")).ino
            dataset = (await fs.lookup(scope, "big")).ino
            yield _Mount(fs, namespace, catalogue, held, dataset)
            held.release(len(held.released))  # let an abandoned reading thread end
            nursery.cancel_scope.cancel()


async def opened(mount: _Mount) -> int:
    """opendir of the dataset, which returns once its first batch is in."""
    return await mount.fs.opendir(mount.dataset)


@asynccontextmanager
async def open_with_the_first_batch(held: _HeldCatalogue) -> AsyncIterator[tuple[_Mount, int]]:
    """:func:`mounted`, and the dataset opened with its first batch let go, the rest held back."""
    async with mounted(held) as mount:
        held.release(1)
        yield mount, await opened(mount)


async def test_readdir_serves_the_first_batches_while_the_rest_is_held_back() -> None:
    held = _HeldCatalogue(files=9)
    async with open_with_the_first_batch(held) as (mount, fh):
        first = await mount.read(fh, 0)
        assert [(next_id, name) for next_id, name, _ in first] == [(1, "f000"), (2, "f001"), (3, "f002")]
        assert mount.catalogue.statistics().streaming == 1
        assert mount.namespace.statistics()["entries_while_streaming"] == 3

        got: list[list[tuple[int, str, int]]] = []

        async def reader_ahead_of_the_stream() -> None:
            got.append(await mount.read(fh, 3))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader_ahead_of_the_stream)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # it waits: an empty answer would end the kernel's reading
            held.release(2)
        assert [name for _, name, _ in got[0]] == ["f003", "f004", "f005"]
        directory = mount.namespace.inodes.get(mount.dataset)
        assert mount.namespace.listed(directory) is None  # the prefetch follows whole listings only
        held.release(len(held.released))
        await mount.catalogue.list_content(DID("s", "big"), dataset=True)  # joins the answer to its end
        listed = mount.namespace.listed(directory)  # whole, though no reader asked since
        assert listed is not None and [info.did.name for info in listed] == held.names
        assert [name for _, name, _ in await mount.read(fh, 6)] == ["f006", "f007", "f008"]
        assert await mount.read(fh, 9) == []  # the end
        assert mount.catalogue.statistics().streaming == 0
        mount.fs.releasedir(fh)
        # whole now, and cached: the next opendir costs no call and shows the same entries
        assert await mount.listed() == held.names and held.calls == 1


async def test_a_second_opendir_while_the_answer_arrives_shares_it() -> None:
    held = _HeldCatalogue(files=7)
    async with mounted(held) as mount:
        handles: list[int] = []
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(lambda: _append_opened(mount, handles))
            await trio.testing.wait_all_tasks_blocked()
            held.release(1)
        one, two = handles
        assert (await mount.read(one, 0)) == (await mount.read(two, 0))
        held.release(len(held.released))
        names = held.names
        assert await mount.read_all(one) == names and await mount.read_all(two) == names
        assert held.calls == 1


async def test_opendirs_waiting_for_a_listing_that_fails_at_once_share_its_error() -> None:
    held = _HeldCatalogue(files=6, broken_at=0)
    async with mounted(held) as mount:
        failed: list[str] = []

        async def open_it() -> None:
            with pytest.raises(CatalogueUnavailableError) as caught:
                await opened(mount)
            failed.append(str(caught.value))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(open_it)
            await trio.testing.wait_all_tasks_blocked()
            held.release(1)
        assert failed == ["rucio server: connection reset by peer"] * 3
        assert held.calls == 1  # not one catalogue call (and its timeout) per waiting opendir


async def _append_opened(mount: _Mount, handles: list[int]) -> None:
    handles.append(await opened(mount))


async def test_a_listing_that_breaks_off_is_an_error_at_the_break_and_is_not_cached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    held = _HeldCatalogue(files=9, broken_at=1)
    async with open_with_the_first_batch(held) as (mount, fh):
        assert len(await mount.read(fh, 0)) == 3
        held.release(2)
        with pytest.raises(CatalogueUnavailableError, match=r"broke off after 3 entries: .*connection reset by peer"):
            await mount.read(fh, 3)
        assert len(await mount.read(fh, 0)) == 3  # what arrived stays readable (rewinddir)
        assert any("event=listing-broken" in record.getMessage() for record in caplog.records)
        # nothing half is kept: the next opendir asks the catalogue again
        held.broken_at = None
        held.release(len(held.released))
        assert await mount.listed() == held.names and held.calls == 2


async def test_a_listing_is_cached_for_the_ttl_from_the_end_of_its_answer() -> None:
    """As a listing read whole: one whose answer took long is not dropped soon after it ended."""
    now = [0.0]
    held = _HeldCatalogue(files=6)
    async with mounted(held, clock=lambda: now[0]) as mount:
        held.release(1)
        await opened(mount)
        now[0] += TTL - 1  # a long answer
        held.release(len(held.released))
        assert await mount.listed() == held.names
        asked = mount.catalogue.statistics().hits
        now[0] += TTL - 1  # long after the listing began, but within the TTL from its end
        assert await mount.listed() == held.names and held.calls == 1
        assert mount.catalogue.statistics().hits == asked  # the namespace's own listing, still kept
        now[0] += 2
        assert await mount.listed() == held.names and held.calls == 2  # expired: listed anew


async def test_lookups_while_the_answer_arrives() -> None:
    held = _HeldCatalogue(files=9)
    async with mounted(held) as mount:
        held.release(1)
        await opened(mount)
        assert (await mount.fs.lookup(mount.dataset, "f001")).size == 1  # already seen
        found: list[int] = []

        async def look_up_a_later_name() -> None:
            found.append((await mount.fs.lookup(mount.dataset, "f007")).size)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look_up_a_later_name)
            await trio.testing.wait_all_tasks_blocked()
            assert found == []  # it may still arrive
            held.release(3)
        assert found == [7]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _expect_missing(mount, "nope"))
            await trio.testing.wait_all_tasks_blocked()
            held.release(len(held.released))


async def _expect_missing(mount: _Mount, name: str) -> None:
    with pytest.raises(NotFoundError):
        await mount.fs.lookup(mount.dataset, name)


async def test_a_cancelled_reader_leaves_the_answer_to_the_others() -> None:
    held = _HeldCatalogue(files=6)
    async with open_with_the_first_batch(held) as (mount, fh):
        with trio.move_on_after(0) as waited:  # a reader interrupted while it waits for more
            await mount.read(fh, 3)
        assert waited.cancelled_caught
        held.release(len(held.released))
        assert await mount.read_all(fh) == held.names
        assert held.calls == 1


async def test_the_mount_ending_mid_answer_ends_waiting_readers_with_an_error() -> None:
    held = _HeldCatalogue(files=6)
    catalogue = CachedCatalogue(held, Config())  # type: ignore[arg-type]
    namespace = Namespace(catalogue, InodeTable(), times_limit=TIMES_LIMIT)
    raised: list[BaseException] = []

    async def reader(entries: Entries) -> None:
        try:
            await entries.ready(3)
        except CatalogueUnavailableError as exc:
            raised.append(exc)

    with trio.fail_after(30):
        async with trio.open_nursery() as outer, trio.open_nursery() as background:
            await background.start(catalogue.run)
            scope = await namespace.lookup(namespace.inodes.get(ROOT_INODE), "s")
            held.release(1)
            entries = await namespace.list_dir(await namespace.lookup(scope, "big"))
            outer.start_soon(reader, entries)
            await trio.testing.wait_all_tasks_blocked()
            background.cancel_scope.cancel()  # the mount ends
        assert [str(exc) for exc in raised] == ["the listing of s:big was interrupted"]
        held.release(len(held.released))
        assert await trio.to_thread.run_sync(held.closed.wait, 10), "the reading thread closed the answer"
    assert catalogue.statistics().streaming == 0


async def test_rewinddir_and_seekdir_see_the_same_positions() -> None:
    held = _HeldCatalogue(files=9)
    async with mounted(held) as mount:
        held.release(2)
        fh = await opened(mount)
        await mount.read(fh, 5, room=0)  # returns once the sixth entry is in
        assert [name for _, name, _ in await mount.read(fh, 0, room=4)] == ["f000", "f001", "f002", "f003"]
        assert [name for _, name, _ in await mount.read(fh, 4)] == ["f004", "f005"]
        assert [name for _, name, _ in await mount.read(fh, 2, room=1)] == ["f002"]  # seekdir back
        held.release(len(held.released))
        assert [name for _, name, _ in await mount.read(fh, 0, room=2)] == ["f000", "f001"]  # rewinddir


async def test_entries_the_kernel_forgot_mid_listing_are_handed_out_anew() -> None:
    held = _HeldCatalogue(files=6)
    async with open_with_the_first_batch(held) as (mount, fh):
        first = await mount.read(fh, 0)
        for _, _, ino in first:
            mount.fs.forget(ino, 1)  # the kernel's only reference
        held.release(len(held.released))
        again = await mount.read_entries(fh)
        assert [name for name, _ in again] == held.names
        dead = {ino for _, _, ino in first}
        assert not dead & {ino for _, ino in again}
        for _, ino in again:
            assert (await mount.fs.getattr(ino)).ino == ino


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=5), st.data())
def test_readdir_agrees_with_the_listing_as_its_batches_arrive(sizes: list[int], data: st.DataObject) -> None:
    """Model: the listing is the files in order; at any time the first ``arrived`` of them are in.
    Any reader at any position gets exactly the model's entries from there (as many as fit and have
    arrived), whatever other handles, rewinds and the kernel's forgets happened, with live inodes."""
    trio.run(_agrees_with_the_model, sizes, data)


async def _agrees_with_the_model(sizes: list[int], data: st.DataObject) -> None:
    held = _HeldCatalogue(sizes=sizes)
    names = held.names
    ends = list(itertools.accumulate(sizes))
    async with mounted(held) as mount:
        released = next((index + 1 for index, end in enumerate(ends) if end > TIMES_LIMIT), held.batches + 1)
        held.release(released)
        handles = [await opened(mount)]
        arrived = ends[released - 1] if released <= held.batches else len(names)
        whole = released > held.batches
        last: list[tuple[int, str, int]] = []
        for step in data.draw(st.lists(st.sampled_from(["release", "read", "read", "forget", "open"]), max_size=12)):
            fh = data.draw(st.sampled_from(handles))
            if step == "release" and not whole:
                released += 1
                held.release(released)
                whole = released > held.batches
                arrived = len(names) if whole else ends[released - 1]
                await mount.read(fh, arrived - 1 if not whole else len(names), room=0)  # until it is in
            elif step == "read":
                start = data.draw(st.integers(min_value=0, max_value=arrived if whole else arrived - 1))
                room = data.draw(st.integers(min_value=1, max_value=5))
                last = await mount.read(fh, start, room)
                end = min(start + room, arrived)
                assert [(next_id, name) for next_id, name, _ in last] == [
                    (index + 1, names[index]) for index in range(start, end)]
                for _, _, ino in last:
                    assert (await mount.fs.getattr(ino)).ino == ino
            elif step == "forget" and last:
                _, _, ino = data.draw(st.sampled_from(last))
                mount.fs.forget(ino, mount.namespace.inodes.lookup_count(ino))  # the kernel's last reference
            elif step == "open":
                handles.append(await opened(mount))
        held.release(held.batches + 1)
        for fh in handles:
            entries = await mount.read_entries(fh)
            assert [name for name, _ in entries] == names
            for _, ino in entries:
                assert (await mount.fs.getattr(ino)).ino == ino
        assert held.calls == 1


class _Calls:
    """Counts the Python and builtin function calls made while it is on (``sys.setprofile``)."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> _Calls:
        sys.setprofile(self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)

    def _note(self, frame: object, event: str, arg: object) -> None:
        if event in ("call", "c_call"):
            self.count += 1


async def test_a_cold_readdir_entry_costs_few_calls() -> None:
    """The work of a cold ``ls -l`` per entry, counted (not timed): its node, attributes and the
    entry built from them. For 100,000 entries each call is about 0.1 µs of the trio thread, which
    the kernel's READDIRPLUS waits for. 30 per entry before the modes of the mount's ownership were
    worked out once and the directory's facts read in one step, 27 after; raise the bound only with a reason."""
    held = _HeldCatalogue(files=600, sizes=[600])
    async with mounted(held) as mount:
        held.release(len(held.released))
        fh = await opened(mount)
        with _Calls() as calls:
            entries = [entry for entry in await mount.fs.readdir(fh, 0, _built)]
        assert len(entries) == 600
        assert calls.count / len(entries) <= 28, calls.count / len(entries)


async def test_entries_are_built_ahead_of_the_kernels_requests() -> None:
    """While ``ls`` works through one reply, the entries after it are built (node, attributes, and
    what the FUSE adapter makes of them), and those of each batch as it arrives: the kernel's next
    request finds them built."""
    held = _HeldCatalogue(files=9)
    built: list[int] = []
    counts = {count: trio.Event() for count in (6, 9)}

    def build(attributes: Attributes) -> Attributes:
        built.append(attributes.ino)
        if len(built) in counts:
            counts[len(built)].set()
        return attributes

    async with open_with_the_first_batch(held) as (mount, fh):
        first = next(iter(await mount.fs.readdir(fh, 0, build)))  # the kernel's buffer holds one entry
        mount.fs.remember_each([first[2]])
        with trio.fail_after(10):  # built in the background
            held.release(2)
            await counts[6].wait()  # the second batch, while the third is held back
            held.release(len(held.released))
            await counts[9].wait()
        rest = list(await mount.fs.readdir(fh, 1, build))
        assert [name for _, name, _, _ in rest] == [f"f{i:03d}" for i in range(1, 9)]
        assert len(built) == 9  # nothing built again for the second request
        mount.fs.releasedir(fh)
