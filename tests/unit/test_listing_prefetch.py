"""Listing-order prefetch: the window follows a reader going through a directory, and only such a reader."""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from datalakefs.fs.prefetch import STREAMS, ListingPrefetch
from datalakefs.model import DID, DIDInfo, DIDType

DIRECTORY = 7


def listing(count: int, size: int = 100) -> tuple[DIDInfo, ...]:
    return tuple(DIDInfo(DID("s", f"f{i:04d}"), DIDType.FILE, size) for i in range(count))


class SlowContent:
    """Fetches that end only when the test says so; records which files were asked for and finished,
    and the batches of cached files paged in."""

    def __init__(self, cached: frozenset[str] = frozenset()) -> None:
        self.asked: list[str] = []
        self.finished: list[str] = []
        self.paged: list[list[str]] = []
        self.cached = cached
        self.release = trio.Event()

    def warmed(self, info: DIDInfo) -> bool:
        return info.did.name in self.cached

    async def page_in(self, infos: Sequence[DIDInfo]) -> None:
        self.paged.append([info.did.name for info in infos])

    async def warm(self, info: DIDInfo) -> None:
        self.asked.append(info.did.name)
        await self.release.wait()
        self.finished.append(info.did.name)


async def test_a_reader_in_listing_order_gets_the_next_files_fetched_ahead() -> None:
    content, files = SlowContent(), listing(100)
    prefetch = ListingPrefetch(content, max_files=4, max_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(prefetch.run)
        prefetch.opened(DIRECTORY, files[10], files)
        await trio.testing.wait_all_tasks_blocked()
        assert content.asked == []  # one open is no pattern
        prefetch.opened(DIRECTORY, files[11], files)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(content.asked) == ["f0012", "f0013", "f0014", "f0015"]
        prefetch.opened(DIRECTORY, files[12], files)
        await trio.testing.wait_all_tasks_blocked()
        assert content.asked[4:] == ["f0016"]  # the window moved on by one, nothing asked twice
        content.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert prefetch.statistics() == {"started": 5, "done": 5, "failed": 0, "cancelled": 0, "paged_in": 0,
                                         "in_flight": 0}
        nursery.cancel_scope.cancel()


async def test_a_reader_that_jumped_elsewhere_is_dropped_once_newer_streams_replace_it() -> None:
    content, files = SlowContent(), listing(100)
    prefetch = ListingPrefetch(content, max_files=4, max_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(prefetch.run)
        for index in (10, 11):
            prefetch.opened(DIRECTORY, files[index], files)
        await trio.testing.wait_all_tasks_blocked()
        for index in range(40, 40 + 10 * STREAMS, 10):  # a random reader: each open a stream of its own
            prefetch.opened(DIRECTORY, files[index], files)
        await trio.testing.wait_all_tasks_blocked()
        content.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert content.finished == []  # nothing fetched for the random opens, the first window dropped
        assert prefetch.statistics()["cancelled"] == 4
        prefetch.opened(DIRECTORY, files[71], files)  # and in order again from there
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(content.asked[4:]) == ["f0072", "f0073", "f0074", "f0075"]
        nursery.cancel_scope.cancel()


async def test_readers_interleaved_in_one_directory_each_get_their_window() -> None:
    content, files = SlowContent(), listing(100)
    prefetch = ListingPrefetch(content, max_files=2, max_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(prefetch.run)
        for index in (0, 50, 1, 51, 2, 52):  # two workers, each given half of the listing
            prefetch.opened(DIRECTORY, files[index], files)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(content.asked) == ["f0002", "f0003", "f0004", "f0052", "f0053", "f0054"]
        assert prefetch.statistics()["cancelled"] == 0
        content.release.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_the_window_is_bounded_in_bytes_and_skips_big_files() -> None:
    content = SlowContent()
    files = (*listing(3, size=400), DIDInfo(DID("s", "big"), DIDType.FILE, 10_000), *listing(6, size=400)[3:])
    prefetch = ListingPrefetch(content, max_files=8, max_bytes=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(prefetch.run)
        for index in (0, 1):
            prefetch.opened(DIRECTORY, files[index], files)
        await trio.testing.wait_all_tasks_blocked()
        # f0002 (400) and, past the big file the reader streams itself, f0003 (400): 800 of 1,000 bytes
        assert sorted(content.asked) == ["f0002", "f0003"]
        content.release.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_a_failed_fetch_is_counted_and_nothing_runs_without_the_nursery() -> None:
    class Failing:
        def warmed(self, info: DIDInfo) -> bool:
            return False

        async def warm(self, info: DIDInfo) -> None:
            raise OSError("storage down")

        async def page_in(self, infos: Sequence[DIDInfo]) -> None:
            raise AssertionError("nothing is cached")

    files = listing(10)
    idle = ListingPrefetch(Failing(), max_files=4, max_bytes=1 << 20)
    for index in (0, 1):
        idle.opened(DIRECTORY, files[index], files)
    assert idle.statistics()["started"] == 0
    prefetch = ListingPrefetch(Failing(), max_files=4, max_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(prefetch.run)
        for index in (0, 1):
            prefetch.opened(DIRECTORY, files[index], files)
        await trio.testing.wait_all_tasks_blocked()
        assert prefetch.statistics()["failed"] == 4
        nursery.cancel_scope.cancel()


async def test_cached_files_ahead_are_paged_in_a_window_at_a_time_and_never_fetched() -> None:
    files = listing(40)
    content = SlowContent(cached=frozenset(f.did.name for f in files) - {"f0005"})
    prefetch = ListingPrefetch(content, max_files=4, max_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(prefetch.run)
        for index in range(0, 10):
            prefetch.opened(DIRECTORY, files[index], files)
        await trio.testing.wait_all_tasks_blocked()
        # one page-in per window's worth of files (not one per open), each ahead of the reader
        assert sorted(content.paged) == [["f0002", "f0003", "f0004"], ["f0006", "f0007", "f0008", "f0009"],
                                         ["f0010", "f0011", "f0012", "f0013"]]
        assert content.asked == ["f0005"]  # only the file not cached is fetched
        assert prefetch.statistics()["paged_in"] == 11
        content.release.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
