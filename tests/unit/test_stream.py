"""Stream mode against the in-process origin: prefetch, single flight, failover, verification."""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import shutil
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from datalakefs.cache import store as store_module
from datalakefs.cache import writer as writer_module
from datalakefs.cache.layout import FileKey
from datalakefs.cache.store import BlockCache
from datalakefs.cache.writer import BlockWriter, ResidentBytes
from datalakefs.config import Config
from datalakefs.daemon import stream_content
from datalakefs.errors import AccessDeniedError, TransferError
from datalakefs.model import DID, FileReplicas, Replica
from datalakefs.staging.stream import INLINE_TRANSFER_MAX, PIECE_ALIGN, StreamReader, StreamService
from datalakefs.staging.stream.fetch import BEHIND_BLOCKS, WINDOW_SHARES_MAX
from datalakefs.transport.http import RangeSink
from tests.faults.harness import BS, info_of, open_reader, payload, ranges, read_all, running, transfers_ended
from tests.faults.origin import FaultyOrigin

DATA = payload(40 * BS + 777, seed=1)
INFO = info_of("big", DATA)


async def test_sequential_reader_gets_a_growing_window_of_large_requests(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            assert await read_all(reader) == DATA
            stats = service.statistics()
    spans = ranges(origin.gets())
    assert spans[0][0] == 0 and spans[-1][1] == len(DATA)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # each byte fetched once
    sizes = [end - start for start, end in spans]
    assert sizes[0] <= 4 * BS  # starts small ...
    assert max(sizes) >= 16 * BS  # ... and grows
    assert len(spans) <= 8
    assert stats.bytes_fetched == len(DATA)
    assert stats.verified_files == 1
    assert origin.violations == []


async def test_small_random_reads_fetch_only_their_pages_and_cache_nothing(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            step = 6 * BS
            offsets = [30 * BS + 5, 3 * BS + 100, 39 * BS + 7, 17 * BS, 3 * BS + 100 + step, 40 * BS + 700]
            for offset in offsets:
                assert await reader.read(offset, 4096) == DATA[offset : offset + 4096]
            stats = service.statistics()
            assert service.cached_bytes(INFO) == 0
    pages = sorted((o // PIECE_ALIGN * PIECE_ALIGN, min(len(DATA), -(-(o + 4096) // PIECE_ALIGN) * PIECE_ALIGN))
                   for o in offsets)
    assert ranges(origin.gets()) == pages
    assert stats.piece_requests == len(offsets)
    assert stats.bytes_fetched == sum(end - start for start, end in pages)
    assert origin.violations == []


async def test_a_read_continues_a_stream_only_if_it_starts_exactly_where_the_last_one_ended(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            start = 10 * BS
            for offset in (start, start + 8192):  # the second one skips a page: random too
                assert await reader.read(offset, 4096) == DATA[offset : offset + 4096]
            assert service.cached_bytes(INFO) == 0
            assert ranges(origin.gets()) == [(start, start + 4096), (start + 8192, start + 12288)]  # one GET each
            assert await reader.read(start + 12288, 4096) == DATA[start + 12288 : start + 16384]  # continues
            whole = [span for span in ranges(origin.gets()) if span[1] - span[0] >= BS]
            assert whole and whole[0][0] == start  # a stream: its window fetches whole blocks
            assert service.statistics().piece_requests == 2
    assert origin.violations == []


@pytest.mark.parametrize(("size", "inline"), [(549, True), (INLINE_TRANSFER_MAX, True), (2 * BS, False)])
async def test_a_small_file_is_fetched_and_cached_on_the_trio_thread(
    tmp_path: Path, size: int, inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole small file needs no thread hop (the trio client's GET); a larger one goes to the
    transport's asyncio thread."""
    threads: set[str] = set()
    for method in ("write", "received"):
        original = getattr(BlockWriter, method)

        def recording(self: BlockWriter, offset: int, data: object, original: Any = original) -> None:
            threads.add(threading.current_thread().name)
            original(self, offset, data)

        monkeypatch.setattr(BlockWriter, method, recording)
    data = payload(size, seed=3)
    info = info_of("small", data)
    with FaultyOrigin({"small": data}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, info, origin.url("small"))
            assert await read_all(reader) == data
            assert service.cached_bytes(info) == size
            assert service.statistics().verified_files == 1
    assert threads == ({threading.current_thread().name} if inline else {"datalakefs-aio"})
    if inline:
        assert ranges(origin.gets()) == [(0, size)]  # one GET, however many reads


async def test_without_piece_reads_small_random_reads_fetch_verified_blocks(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path, config=Config(piece_reads=False)) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            assert await reader.read(30 * BS + 5, 4096) == DATA[30 * BS + 5 : 30 * BS + 5 + 4096]
            assert service.statistics().piece_requests == 0
            await transfers_ended(service.statistics)
            assert service.cached_bytes(INFO) == BS
    assert ranges(origin.gets()) == [(30 * BS, 31 * BS)]


async def test_large_random_reads_fetch_the_blocks_they_touch(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            offsets = [30 * BS + 5, 10 * BS + 100]
            for offset in offsets:
                assert await reader.read(offset, BS) == DATA[offset : offset + BS]
            assert service.statistics().piece_requests == 0
    assert ranges(origin.gets()) == sorted((o // BS * BS, o // BS * BS + 2 * BS) for o in offsets)


async def test_small_reads_are_served_from_cached_blocks(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            await reader.read(20 * BS, BS)  # a large random read caches block 20
            before = len(origin.requests)
            assert await reader.read(20 * BS + 4000, 300) == DATA[20 * BS + 4000 : 20 * BS + 4300]
            assert len(origin.requests) == before


async def test_readers_of_one_cold_piece_share_one_get(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}, latency=0.1) as origin:
        async with running(tmp_path) as service:
            results: list[bytes] = []

            async def reader_task() -> None:
                results.append(await open_reader(service, INFO, origin.url("big")).read(9 * BS + 10, 100))

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(reader_task)
    assert results == [DATA[9 * BS + 10 : 9 * BS + 110]] * 16
    assert ranges(origin.gets()) == [(9 * BS, 9 * BS + PIECE_ALIGN)]


class _Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


async def test_a_piece_read_runs_in_the_readers_own_task(tmp_path: Path) -> None:
    """A random read spawns no task: each spawn and wake-up is a scheduler round with an epoll_wait,
    more than the GET itself costs on a local link."""
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            assert await reader.read(5 * BS + 3, 100) == DATA[5 * BS + 3 : 5 * BS + 103]  # connects, locates
            spawns = _Spawns()
            trio.lowlevel.add_instrument(spawns)
            try:
                for offset in (21 * BS + 7, 2 * BS + 4000, 37 * BS):
                    assert await reader.read(offset, 4096) == DATA[offset : offset + 4096]
            finally:
                trio.lowlevel.remove_instrument(spawns)
            assert service.statistics().piece_requests == 4
    assert spawns.count == 0


async def test_a_piece_is_fetched_again_for_its_waiters_when_its_fetching_reader_is_interrupted(
    tmp_path: Path,
) -> None:
    with FaultyOrigin({"big": DATA}, latency=0.2) as origin:
        async with running(tmp_path) as service:
            offset = 14 * BS + 50
            first = open_reader(service, INFO, origin.url("big"))
            second = open_reader(service, INFO, origin.url("big"))
            got: list[bytes] = []

            async def interrupted(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    await first.read(offset, 100)

            async def waiting() -> None:
                got.append(await second.read(offset, 100))

            async with trio.open_nursery() as nursery:
                scope = await nursery.start(interrupted)
                await trio.testing.wait_all_tasks_blocked()  # the first reader's GET is out
                nursery.start_soon(waiting)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
            assert scope.cancelled_caught
            assert service.statistics().piece_requests == 2  # the interrupted GET, then the waiter's own
    assert got == [DATA[offset : offset + 100]]


async def test_a_piece_read_fails_over_to_the_next_replica(tmp_path: Path) -> None:
    with (
        FaultyOrigin({"big": DATA}, fault_rate=1.0, faults=["status"]) as bad,
        FaultyOrigin({"big": DATA}) as good,
    ):
        async with running(tmp_path) as service:
            reader = open_reader(service, INFO, bad.url("big"), good.url("big"))
            assert await reader.read(12 * BS + 5, 10) == DATA[12 * BS + 5 : 12 * BS + 15]
            assert await reader.read(33 * BS, 10) == DATA[33 * BS : 33 * BS + 10]
    assert len(bad.gets()) == 1  # the reader sticks to the replica that worked
    assert len(good.gets()) == 2


async def test_a_random_reader_that_turns_sequential_caches_whole_blocks(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            offset = 25 * BS
            await reader.read(offset, 4096)  # random: a piece
            for _ in range(8):  # then sequential
                offset += 4096
                assert await reader.read(offset, 4096) == DATA[offset : offset + 4096]
            await transfers_ended(service.statistics)
            assert service.cached_bytes(INFO) >= BS
            assert service.statistics().piece_requests == 1


async def test_cache_hits_never_reach_the_network(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            await read_all(open_reader(service, INFO, origin.url("big")))
            before = len(origin.requests)
            again = open_reader(service, INFO, origin.url("big"))
            assert await read_all(again, chunk=BS) == DATA
            assert await again.read(5 * BS + 3, 10) == DATA[5 * BS + 3 : 5 * BS + 13]
            stats = service.statistics()
            assert service.cached_bytes(INFO) == len(DATA)
    assert len(origin.requests) == before
    assert stats.hits >= 42
    assert 0 < stats.hit_rate < 1


async def test_blocks_just_written_past_the_page_cache_are_served_from_memory_unchecked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold sequential read gets each block from the copy the writer handed over (it was checked
    against its page CRCs as it arrived), not by reading the cache file back and checking it again;
    a later service (a restart) reads the cache file, checked."""
    monkeypatch.setattr(store_module, "filesystem_type", lambda path: "ext4")  # a local disk, wherever run
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            file_reads = 0  # reads that found the block in the cache file
            real_read = service.cache.read

            def counting_read(*args: object) -> bytes | None:
                nonlocal file_reads
                found = real_read(*args)  # type: ignore[arg-type]
                file_reads += found is not None
                return found

            monkeypatch.setattr(service.cache, "read", counting_read)
            assert await read_all(open_reader(service, INFO, origin.url("big"))) == DATA
            assert service.cached_bytes(INFO) == len(DATA)
            assert file_reads == 0
            monkeypatch.undo()
        async with running(tmp_path) as restarted:
            data_fd = os.open(restarted.cache.data_path(FileKey.of(INFO)), os.O_WRONLY)
            os.pwrite(data_fd, b"\xff", 7 * BS + 5)  # damage one page of block 7 on disk
            os.close(data_fd)
            assert await read_all(open_reader(restarted, INFO, origin.url("big"))) == DATA
            assert restarted.statistics().cache.corrupt_blocks == 1  # caught, dropped and fetched again
    assert origin.violations == []


async def test_the_window_is_shared_by_at_most_eight_streaming_readers(tmp_path: Path) -> None:
    """Each of N streaming readers may fetch ahead ``prefetch_max``/N, down to an eighth of it (enough
    to hide a 30 ms round trip for 16 readers); a reader that stops streaming gives its share back."""
    async with running(tmp_path) as service:
        readers = [open_reader(service, INFO, "http://origin.invalid/big") for _ in range(16)]
        limits = [service.window_limit(reader) for reader in readers]
        assert (limits[0], limits[1], limits[3]) == (64 * BS, 32 * BS, 16 * BS)
        assert limits[WINDOW_SHARES_MAX - 1:] == [64 * BS // WINDOW_SHARES_MAX] * (17 - WINDOW_SHARES_MAX)
        for reader in readers[1:]:
            await reader.close()
        assert service.window_limit(readers[0]) == 64 * BS


class _Given(ResidentBytes):
    """A block in memory that notes when it is given back."""

    __slots__ = ("given", "index")

    def __init__(self, buffer: mmap.mmap, length: int, index: int, given: list[int]) -> None:
        super().__init__(buffer, length)
        self.index, self.given = index, given

    def release(self) -> None:
        self.given.append(self.index)


async def test_blocks_read_to_their_end_leave_memory_but_the_last_few(tmp_path: Path) -> None:
    """A block a reader finished leaves memory, but for the last BEHIND_BLOCKS of them (a late read
    of one), and its buffer goes back to the pool at once: the transport receives the next blocks into
    the few buffers just read out, not into ones that sat in memory a window long. A block not read to
    its end stays, and unread blocks leave least recently used first."""
    async with running(tmp_path, config=Config(prefetch_max=16 * BS)) as service:
        key = FileKey.of(INFO)
        given: list[int] = []
        landed = 2 * BEHIND_BLOCKS + 4
        for index in range(landed):
            buffer = mmap.mmap(-1, BS)
            buffer[:] = DATA[index * BS : (index + 1) * BS]
            service._keep_in_memory((key.digest, index), _Given(buffer, BS, index, given))
        assert service._read_block(key, 0, 0, 10) == DATA[:10]  # begun, not finished
        for index in range(1, landed - 2):
            assert service._read_block(key, index, 0, BS) == DATA[index * BS : (index + 1) * BS]
        assert given == list(range(1, landed - 2 - BEHIND_BLOCKS))
        late = landed - 2 - BEHIND_BLOCKS  # the oldest block kept behind: a late read finds it
        assert service._read_block(key, late, BS - 10, 10) == DATA[(late + 1) * BS - 10 : (late + 1) * BS]
        held = [index for index in range(landed) if service._held((key.digest, index))]
        assert held == [0, *range(late, landed)]
        for index in range(landed, landed + 30):  # room for 32 unread: one of the 3 there must leave
            service._keep_in_memory((key.digest, index), memoryview(DATA[:BS]))
        assert not service._held((key.digest, landed - 2))  # the least recently used
        assert service._held((key.digest, 0)) and service._held((key.digest, late))


async def test_parallel_readers_share_one_window_so_their_blocks_fit_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 sequential readers of one cold file, each reading its own quarter, in turn: their windows
    share ``prefetch_max``, so what they fetch ahead together fits in memory and every block is still
    there when its reader comes (none is read back from the disk), however far the transfers run
    ahead of the readers, and once all four stream no GET asks for more than a quarter of one
    reader's window."""
    monkeypatch.setattr(store_module, "filesystem_type", lambda path: "ext4")  # blocks land resident
    data = payload(64 * BS, seed=4)
    info = info_of("wide", data)
    chunk = 256 << 10
    part = len(data) // 4
    with FaultyOrigin({"wide": data}) as origin:
        async with running(tmp_path, config=Config(prefetch_max=8 * BS, piece_reads=False)) as service:
            readers = [open_reader(service, info, origin.url("wide")) for _ in range(4)]
            for step in range(part // chunk):
                for k, reader in enumerate(readers):
                    offset = k * part + step * chunk
                    assert await reader.read(offset, chunk) == data[offset : offset + chunk]
                await transfers_ended(service.statistics)  # what the windows asked for is all ahead
                if step == 2 * BS // chunk:  # each reader is two blocks in: all four stream
                    streaming = len(origin.requests)
            stats = service.statistics()
            for reader in readers:
                await reader.close()
            assert not service._streams
    late = ranges(Counter(request.range for request in origin.requests[streaming:]))
    assert late and max(end - start for start, end in late) <= 8 * BS // 4
    assert stats.disk_reads == 0
    assert stats.bytes_fetched == len(data)


async def test_a_read_inside_a_block_in_memory_is_a_view_of_its_buffer_not_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold sequential read is answered from the buffer the block was received into: the FUSE reply
    copies it to the kernel, and nothing copies it before."""
    monkeypatch.setattr(store_module, "filesystem_type", lambda path: "ext4")  # blocks land resident
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            views = []
            for offset in range(0, 4 * BS, BS // 2):
                data = await reader.read(offset, BS // 2)
                assert data == DATA[offset : offset + BS // 2]  # used before the next await, as pyfuse3 does
                views.append(isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap))
                del data
    assert all(views)


class _HeldDisk:
    """The cache's O_DIRECT writes, held: those of blocks before ``first_held`` until ``early`` is set,
    those that reach it until ``late`` is set (``reached_late``: one of them waits)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, first_held: int) -> None:
        self.early, self.late, self.reached_late = threading.Event(), threading.Event(), threading.Event()
        direct_fds: set[int] = set()
        real_open, real_pwrite, real_pwritev = os.open, os.pwrite, os.pwritev

        def spy_open(path: str, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
            fd = real_open(path, flags, mode, **kwargs)
            if flags & os.O_DIRECT:
                direct_fds.add(fd)
            return fd

        def hold(fd: int, offset: int, length: int) -> None:
            if fd in direct_fds and offset + length <= first_held * BS:
                assert self.early.wait(20)
            elif fd in direct_fds:
                self.reached_late.set()
                assert self.late.wait(20)

        def held_pwrite(fd: int, data: memoryview, offset: int) -> int:
            hold(fd, offset, len(data))
            return real_pwrite(fd, data, offset)

        def held_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
            hold(fd, offset, sum(map(len, buffers)))
            return real_pwritev(fd, buffers, offset)

        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(os, "pwrite", held_pwrite)
        monkeypatch.setattr(os, "pwritev", held_pwritev)

    def release(self) -> None:
        self.early.set()
        self.late.set()


async def test_a_reader_gets_its_block_before_the_disk_wrote_it_and_the_cache_journals_it_only_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk is off the readers' path: with the cache's disk writes held, a reader still gets the
    blocks as they arrive, while the cache holds none of them (no journal record, nothing readable
    from its data file). They are journaled once their writes ended. The whole-file check still
    comes with the read of the file's last bytes: that read waits for the file's last writes."""
    monkeypatch.setattr(store_module, "filesystem_type", lambda path: "ext4")  # blocks go O_DIRECT
    key = FileKey.of(INFO)
    last_full = len(DATA) // BS - 1  # the last whole block: its write is held until the end
    disk = _HeldDisk(monkeypatch, first_held=last_full)
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            try:
                reader = open_reader(service, INFO, origin.url("big"))
                for offset in range(0, 3 * BS, BS // 2):
                    assert await reader.read(offset, BS // 2) == DATA[offset : offset + BS // 2]
                for index in range(3):
                    assert not service.cache.has_block(key, index)
                    assert service.cache.read(key, index, 0, 10) is None
                assert not os.path.exists(service.cache.index_path(key))  # no journal yet
                disk.early.set()
                await transfers_ended(service.statistics)
                assert all(service.cache.has_block(key, index) for index in range(3))
                got = bytearray(DATA[: 3 * BS])

                async def read_the_rest() -> None:
                    got.extend(await reader.read(len(got), len(DATA)))
                    while len(got) < len(DATA):
                        got.extend(await reader.read(len(got), 128 << 10))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_the_rest)
                    with trio.fail_after(20):
                        while service.statistics().bytes_fetched < len(DATA):  # noqa: ASYNC110
                            await trio.sleep(0.01)  # the bytes arrive on the transport's thread
                    await trio.testing.wait_all_tasks_blocked()
                    # the disk thread gets to the held write on its own time (not a trio task)
                    assert await trio.to_thread.run_sync(disk.reached_late.wait, 20)
                    assert len(got) < len(DATA)  # the last read waits for the last writes ...
                    assert service.statistics().verified_files == 0
                    disk.late.set()
                assert bytes(got) == DATA
                assert service.statistics().verified_files == 1  # ... to check the whole file first
                assert service.cache.is_verified(key)
            finally:
                disk.release()


async def test_readers_waiting_together_for_a_files_last_writes_verify_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two readers of the file's last bytes both wait for its last disk writes; when the writes end,
    the whole-file check runs once (not once per waiting reader)."""
    monkeypatch.setattr(store_module, "filesystem_type", lambda path: "ext4")  # blocks go O_DIRECT
    last_full = len(DATA) // BS - 1
    disk = _HeldDisk(monkeypatch, first_held=last_full)
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            try:
                readers = [open_reader(service, INFO, origin.url("big")) for _ in range(2)]
                got: list[bytes] = [b"", b""]

                async def read_the_end(which: int) -> None:
                    got[which] = bytes(await readers[which].read(last_full * BS, len(DATA)))

                disk.early.set()
                assert await readers[0].read(0, last_full * BS) == DATA[: last_full * BS]
                async with trio.open_nursery() as nursery:
                    for which in range(2):
                        nursery.start_soon(read_the_end, which)
                    with trio.fail_after(20):
                        while service.statistics().bytes_fetched < len(DATA):  # noqa: ASYNC110
                            await trio.sleep(0.01)  # the bytes arrive on the transport's thread
                    await trio.testing.wait_all_tasks_blocked()
                    # the disk thread gets to the held write on its own time (not a trio task)
                    assert await trio.to_thread.run_sync(disk.reached_late.wait, 20)
                    assert got == [b"", b""]  # both wait for the last writes
                    disk.late.set()
                assert got == [DATA[last_full * BS :]] * 2
                assert service.statistics().verified_files == 1
            finally:
                disk.release()


class _GatedTransport:
    """Serves ``DATA`` once ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = trio.Event()

    async def fetch(self, url: str, start: int, length: int, total: int, sink: RangeSink) -> None:
        await self.gate.wait()
        try:
            sink.write(start, DATA[start : start + length])
        finally:
            sink.close()


async def test_a_read_across_blocks_holds_no_view_of_a_block_while_it_waits_for_the_next(tmp_path: Path) -> None:
    """Block 0 is in memory, block 1 on its way: while the read waits for block 1, block 0 leaves memory
    and its buffer is reused for another block. The read still returns block 0's bytes (a view of it
    kept across the wait would show the new block's)."""
    cache = BlockCache(tmp_path, capacity=1 << 30, block_size=BS)
    await cache.open()
    transport = _GatedTransport()
    service = StreamService(cache, transport, Config(piece_reads=False).replace(cache_dir=tmp_path))
    key = FileKey.of(INFO)
    buffer = mmap.mmap(-1, BS)
    buffer[:] = DATA[:BS]
    result = None

    async def read() -> None:
        nonlocal result
        result = await open_reader(service, INFO, "http://origin.invalid/big").read(BS - 100, 200)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            service._keep_in_memory((key.digest, 0), ResidentBytes(buffer, BS))
            async with trio.open_nursery() as reading:
                reading.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                assert (key.digest, 1) in service._pending  # the read waits for block 1
                service._forget_in_memory()  # block 0 leaves memory: its buffer goes back to the pool ...
                buffer[:] = bytes(BS)  # ... and a transport thread receives another block into it
                transport.gate.set()
            nursery.cancel_scope.cancel()
    finally:
        cache.close()
    assert result == DATA[BS - 100 : BS + 100]


async def test_blocks_leaving_memory_while_a_view_of_them_is_alive_raise_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A view kept somewhere (a traceback's frame) when its block leaves memory with the buffer pool
    full: the buffer is dropped, not closed (closing raises while a view is alive), and the view still
    reads its bytes. Both ways out: eviction by a newer block, and clearing the cache."""
    monkeypatch.setattr(writer_module, "_buffers", writer_module._Buffers(keep=0))  # the pool is full
    async with running(tmp_path, config=Config(prefetch_max=2 * BS)) as service:
        key = FileKey.of(INFO)
        views = []
        for index in range(5):  # room for 4: block 0 is evicted when block 4 comes in
            buffer = mmap.mmap(-1, BS)
            buffer[:] = DATA[index * BS : (index + 1) * BS]
            service._keep_in_memory((key.digest, index), ResidentBytes(buffer, BS))
            if index < 2:
                views.append(service._read_block(key, index, 0, 10))
        assert (key.digest, 0) not in service._in_memory
        await service.clear()
        assert not service._in_memory
        assert views == [DATA[:10], DATA[BS : BS + 10]]


async def test_readers_racing_the_reuse_of_block_buffers_always_get_their_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight readers of one cold file with room in memory for 4 blocks: blocks leave memory and their
    buffers are received into again by the transport's thread all the time. Each read is checked as
    soon as it returns, before its task awaits again (as pyfuse3 writes its reply)."""
    monkeypatch.setattr(store_module, "filesystem_type", lambda path: "ext4")  # blocks land resident
    wrong: list[int] = []
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path, config=Config(prefetch_max=2 * BS, piece_reads=False)) as service:

            async def reader_task(k: int) -> None:
                reader = open_reader(service, INFO, origin.url("big"))
                size = (256 << 10) + 1000 * k  # reads that cross blocks, and reads inside one
                offset = k * 5 * BS
                while offset < min(len(DATA), (k + 1) * 5 * BS):
                    data = await reader.read(offset, size)
                    if data != DATA[offset : offset + size]:
                        wrong.append(offset)
                    offset += len(data)

            async with trio.open_nursery() as nursery:
                for k in range(8):
                    nursery.start_soon(reader_task, k)
            assert service.statistics().bypassed_blocks == 0
    assert wrong == []


async def test_sixty_four_readers_of_a_cold_block_make_one_get_per_block(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}, latency=0.1) as origin:
        async with running(tmp_path) as service:
            results: list[bytes] = []

            async def reader_task(i: int) -> None:
                reader = open_reader(service, INFO, origin.url("big"))
                results.append(await reader.read(7 * BS + i * 1000, 2 * BS))

            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(reader_task, i)
    assert len(results) == 64 and all(len(r) == 2 * BS for r in results)
    gets = origin.gets()
    assert set(gets.values()) == {1}
    covered = [block for start, end in ranges(gets) for block in range(start // BS, -(-end // BS))]
    assert len(covered) == len(set(covered))  # no block transferred twice
    assert {7, 8, 9} <= set(covered)


async def test_failover_to_the_next_replica_and_stick_to_it(tmp_path: Path) -> None:
    with (
        FaultyOrigin({"big": DATA}, fault_rate=1.0, faults=["status"]) as broken,
        FaultyOrigin({"big": DATA}) as good,
    ):
        async with running(tmp_path) as service:
            reader = open_reader(service, INFO, broken.url("big"), good.url("big"))
            assert await reader.read(0, 1000) == DATA[:1000]
            asked = len(broken.requests)
            assert await reader.read(20 * BS, 1000) == DATA[20 * BS : 20 * BS + 1000]
            assert service.statistics().failed_requests == asked
    assert asked == 1
    assert len(broken.requests) == asked  # the reader now starts with the replica that worked


async def test_an_endpoint_that_refused_a_connection_is_tried_last_by_the_next_files(tmp_path: Path) -> None:
    """A dead XCache costs the mount one failed connection, not one per file of the dataset."""
    with socket.socket() as closed:  # a port nothing listens on: connections are refused
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    files = {f"f{i}": payload(1000 + i, seed=i) for i in range(5)}
    with FaultyOrigin(files) as good:
        async with running(tmp_path, retries=0) as service:
            for name, data in files.items():
                reader = open_reader(service, info_of(name, data), f"{dead}/{name}", good.url(name))
                assert await read_all(reader) == data
            assert service.statistics().failed_requests == 1
    assert len(good.requests) == len(files)


async def test_when_every_replica_fails_the_read_is_eio_with_every_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        FaultyOrigin({"big": DATA}, fault_rate=1.0, faults=["status"]) as one,
        FaultyOrigin({"big": DATA}, latency=5) as two,  # never answers in time
    ):
        async with running(tmp_path, retries=1, stall=0.2) as service:
            reader = open_reader(service, INFO, one.url("big"), two.url("big"))
            with pytest.raises(TransferError) as caught:
                await reader.read(0, 100)
    assert caught.value.errno == errno.EIO
    message = str(caught.value)
    assert message.count("server error") == 2 and message.count("timeout") == 2
    assert len(one.requests) == len(two.requests) == 2  # 1 + http_retries rounds
    assert "every replica failed" in caplog.text


async def test_when_every_replica_refuses_the_read_is_eacces_without_retries(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}, deny={"big": 403}) as origin:
        async with running(tmp_path, retries=3) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            with pytest.raises(AccessDeniedError) as caught:
                await reader.read(0, 100)
    assert caught.value.errno == errno.EACCES
    assert len(origin.requests) == 1


async def test_xcache_is_tried_before_the_replica(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}) as xcache, FaultyOrigin({"big": DATA}) as origin:
        config = Config(xcache=xcache.base.removeprefix("http://"))
        async with running(tmp_path, config=config) as service:
            reader = open_reader(service, INFO, origin.url("big"))
            assert await reader.read(BS, 10) == DATA[BS : BS + 10]
    assert len(xcache.requests) == 1 and origin.requests == []


async def test_whole_file_mismatch_drops_the_file_and_fails_the_read(tmp_path: Path) -> None:
    small = payload(3 * BS + 5, seed=4)
    with FaultyOrigin({"f": small}, fault_rate=1.0, faults=["corrupt"]) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, info_of("f", small), origin.url("f"))
            with pytest.raises(TransferError, match="adler32"):
                await read_all(reader, chunk=BS)
            assert service.cached_bytes(info_of("f", small)) == 0
            assert service.statistics().cache.checksum_mismatches == 1


async def test_after_a_whole_file_mismatch_a_retry_fetches_every_block_again(tmp_path: Path) -> None:
    """The storage served other bytes than the catalogue's (a replaced file); once it serves the right
    ones, reading the file again returns them: no block of the bad copy is kept in memory, where it
    would be served again unverified (the cache dropped the file, so it would never be checked)."""
    right = payload(3 * BS + 5, seed=4)
    with FaultyOrigin({"f": payload(len(right), seed=6)}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, info_of("f", right), origin.url("f"))
            with pytest.raises(TransferError, match="adler32"):
                await read_all(reader, chunk=BS)
            origin.files["f"] = right
            assert await read_all(reader, chunk=BS) == right
            assert service.statistics().verified_files == 1


async def test_a_file_with_a_wrong_catalogue_checksum_is_never_returned_whole(tmp_path: Path) -> None:
    small = payload(BS // 2, seed=5)
    info = info_of("f", small, adler=1)
    with FaultyOrigin({"f": small}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, info, origin.url("f"))
            for _ in range(2):  # dropped and fetched again: it fails again, never served
                with pytest.raises(TransferError, match="adler32"):
                    await reader.read(0, BS)


async def test_disk_errors_do_not_fail_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int, data: bytes | list[memoryview], offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with FaultyOrigin({"big": DATA}) as origin:
        async with running(tmp_path) as service:
            monkeypatch.setattr(os, "pwrite", no_space)
            monkeypatch.setattr(os, "pwritev", no_space)
            reader = open_reader(service, INFO, origin.url("big"))
            assert await read_all(reader, chunk=BS) == DATA
            monkeypatch.undo()
            stats = service.statistics()
    assert stats.bypassed_blocks >= 41
    assert stats.cache.used_bytes == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> object:
    """A 6 MiB tmpfs, when this process may mount one."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mountpoint)], check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=True)


async def test_a_full_cache_disk_still_serves_reads(small_disk: Path) -> None:
    with FaultyOrigin({"big": DATA}) as origin:
        async with running(small_disk) as service:  # the cache thinks it has 1 GiB
            for _ in range(2):
                reader = open_reader(service, INFO, origin.url("big"))
                assert await read_all(reader, chunk=BS) == DATA
            stats = service.statistics()
    assert stats.bypassed_blocks > 0
    assert stats.cache.evictions > 0  # ENOSPC made room for the next blocks
    assert stats.cache.used_bytes < 6 * BS


async def test_stopping_the_service_fails_the_waiting_reads(tmp_path: Path) -> None:
    failures: list[TransferError] = []
    with FaultyOrigin({"big": DATA}, latency=10) as origin:
        async with trio.open_nursery() as outside, running(tmp_path, stall=30) as service:

            async def read() -> None:
                try:
                    await open_reader(service, INFO, origin.url("big")).read(0, 10)
                except TransferError as exc:
                    failures.append(exc)

            outside.start_soon(read)
            await trio.sleep(0.3)  # the read now waits for a stalled transfer
            # leaving ``running`` cancelled the service
    assert len(failures) == 1
    assert "stopped" in str(failures[0])


class FakeCatalogue:
    """The catalogue's answer is ``replicas``; :meth:`locate` answers ``presumed`` first when given."""

    def __init__(self, replicas: FileReplicas, presumed: FileReplicas | None = None) -> None:
        self.replicas = replicas
        self.presumed = presumed
        self.calls = 0

    async def list_replicas(self, dids: list[DID]) -> list[FileReplicas]:
        self.calls += 1
        return [self.replicas]

    async def locate(self, did: DID) -> FileReplicas | None:
        if self.presumed is not None:
            return self.presumed
        return (await self.list_replicas([did]))[0]


@contextlib.asynccontextmanager
async def presumed_elsewhere(tmp_path: Path, actual: str) -> AsyncIterator[tuple[FakeCatalogue, StreamReader]]:
    """An open file of running stream mode, presumed at a path the origin lacks; the catalogue places it at
    ``actual``."""
    with FaultyOrigin({"big": DATA}) as origin:
        presumed = FileReplicas(INFO, (Replica("R", origin.url("not-there")),), presumed=True)
        catalogue = FakeCatalogue(FileReplicas(INFO, (Replica("R", origin.url(actual)),)), presumed)
        content = stream_content(Config(cache_dir=tmp_path), catalogue)
        async with trio.open_nursery() as nursery:
            await nursery.start(content.run)
            yield catalogue, await content.open(INFO, nonblocking=False)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("size", [len(DATA), 3000])  # a block transfer, and a piece read of a small range
async def test_a_file_not_where_it_was_presumed_is_read_where_the_catalogue_says(tmp_path: Path, size: int) -> None:
    async with presumed_elsewhere(tmp_path, "big") as (catalogue, opened):
        assert await opened.read(BS * 3, size) == DATA[BS * 3 : BS * 3 + size]
        assert catalogue.calls == 1  # asked once, after the presumed place answered 404
        await opened.close()


async def test_a_file_the_catalogue_places_wrongly_fails_after_one_question(tmp_path: Path) -> None:
    async with presumed_elsewhere(tmp_path, "gone") as (catalogue, opened):
        with pytest.raises(TransferError, match="every replica failed"):
            await opened.read(0, BS)
        assert catalogue.calls == 1


async def test_stream_content_is_the_filesystems_file_content(tmp_path: Path) -> None:
    with FaultyOrigin({"big": DATA}) as origin:
        catalogue = FakeCatalogue(FileReplicas(INFO, (Replica("R", origin.url("big")),)))
        content = stream_content(Config(cache_dir=tmp_path), catalogue)
        assert content.statistics().as_dict()["requests"] == 0  # before it runs, too
        async with trio.open_nursery() as nursery:
            await nursery.start(content.run)
            opened = await content.open(INFO, nonblocking=False)
            assert catalogue.calls == 0  # opening costs nothing
            assert opened.keep_cache
            assert await opened.read(0, 100) == DATA[:100]  # the start of a stream: its window is cached
            await transfers_ended(content.statistics)
            assert content.cached_bytes(INFO) > 0
            assert content.state(INFO).startswith("stream: ")
            assert await read_all(opened, chunk=BS) == DATA
            await opened.close()
            assert content.state(INFO) == "stream: cached, verified"
            assert content.statistics().as_dict()["verified_files"] == 1
            await content.clear()
            assert content.cached_bytes(INFO) == 0
            nursery.cancel_scope.cancel()
    assert catalogue.calls == 1


@pytest.mark.parametrize("data", [DATA, DATA[:3000]])  # blocks through aiohttp, and a small file inline
async def test_a_warm_fills_the_cache_without_reading_the_file_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    info = info_of("warmed", data)
    with FaultyOrigin({"warmed": data}) as origin:
        catalogue = FakeCatalogue(FileReplicas(info, (Replica("R", origin.url("warmed")),)))
        content = stream_content(Config(cache_dir=tmp_path), catalogue)
        async with trio.open_nursery() as nursery:
            await nursery.start(content.run)
            with monkeypatch.context() as patch:
                patch.setattr(BlockCache, "read", _no_read)
                await content.warm(info)
            assert content.state(info) == "stream: cached, verified"
            requests = content.statistics().requests
            opened = await content.open(info, nonblocking=False)
            assert await read_all(opened, chunk=BS) == data
            assert content.statistics().requests == requests  # served from the cache
            await opened.close()
            nursery.cancel_scope.cancel()


def _no_read(*args: object) -> bytes | None:
    raise AssertionError("a warm read a block out of the cache")
