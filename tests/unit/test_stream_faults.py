"""Reliability: a misbehaving origin and a damaged cache must never produce a wrong byte."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from datalakefs.cache import writer as writer_module
from datalakefs.cache.layout import PAGE_SIZE, FileKey
from datalakefs.staging.stream import StreamReader, StreamService
from tests.faults.harness import BS, info_of, open_reader, payload, read_all, running
from tests.faults.origin import FaultyOrigin

FILES = {"a": payload(9 * BS + 1, seed=11), "b": payload(6 * BS + 333, seed=12), "c": payload(3 * BS, seed=13)}
INFOS = {name: info_of(name, data) for name, data in FILES.items()}


async def test_thousands_of_random_reads_through_ten_percent_faults_return_no_wrong_byte(tmp_path: Path) -> None:
    with (
        FaultyOrigin(FILES, fault_rate=0.1, seed=1, stall=5) as one,
        FaultyOrigin(FILES, fault_rate=0.1, seed=2, stall=5) as two,
    ):
        # A cache of 8 blocks for 19 MiB of files: blocks are evicted and fetched again all the time.
        async with running(tmp_path, capacity=8 * BS, retries=4, stall=0.2) as service:
            reads = 0

            async def worker(seed: int) -> None:
                nonlocal reads
                rng = random.Random(seed)
                readers: dict[str, StreamReader] = {}
                positions = dict.fromkeys(FILES, 0)
                for _ in range(900):
                    name = rng.choice(sorted(FILES))
                    data = FILES[name]
                    if name not in readers or rng.random() < 0.02:
                        readers[name] = open_reader(service, INFOS[name], one.url(name), two.url(name))
                    if rng.random() < 0.4:  # a sequential stretch, like the kernel's read-ahead
                        offset = positions[name] if positions[name] < len(data) else 0
                        size = 128 << 10
                    else:
                        offset = rng.randrange(len(data))
                        size = rng.randrange(1, 300_000)
                    got = await readers[name].read(offset, size)
                    assert got == data[offset : offset + size], f"wrong bytes: {name} {offset}+{size}"
                    positions[name] = offset + len(got)
                    reads += 1

            async with trio.open_nursery() as nursery:
                for seed in range(4):
                    nursery.start_soon(worker, seed)
            stats = service.statistics()
    faults = [r.fault for r in one.requests + two.requests if r.fault]
    assert reads == 3600
    assert len(faults) >= 30 and len(set(faults)) == 5
    assert stats.failed_requests >= len(faults) - 5  # every injected fault was seen as a failure
    assert stats.cache.evictions > 0
    assert one.violations == two.violations == []


def _blocks_on_disk(service: StreamService, key: FileKey) -> list[int]:
    return [i for i in range(-(-key.size // BS)) if service.cache.has_block(key, i)]


def _damage(service: StreamService, key: FileKey, index: int, rng: random.Random, kind: str) -> None:
    """Damage block ``index`` of ``key`` on disk the way ``kind`` says."""
    data, start = service.cache.data_path(key), index * BS
    if kind == "truncate":  # every later block goes too
        os.truncate(data, start + rng.randrange(BS))
        return
    if kind == "journal":  # what the journal lists from the damage on is forgotten at the next load
        journal = service.cache.index_path(key)
        with open(journal, "r+b") as fh:
            fh.seek(rng.randrange(os.path.getsize(journal)))
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0x10]))
        return
    with open(data, "r+b") as fh:
        if kind == "flip":
            fh.seek(start + rng.randrange(BS))
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))
        elif kind == "zero":  # what a crash without fsync can leave
            fh.seek(start + rng.randrange(BS // PAGE_SIZE) * PAGE_SIZE)
            fh.write(bytes(PAGE_SIZE))
        elif kind == "swap":
            other = (index + rng.randrange(1, key.size // BS)) % (key.size // BS)
            fh.seek(other * BS)
            replacement = fh.read(BS)
            if len(replacement) < BS:  # that block was past a truncation
                replacement = bytes(BS)
            fh.seek(start)
            fh.write(replacement)


async def test_every_damaged_cache_block_is_detected_and_never_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Buffered writes only: a block written past the page cache is served from its in-memory copy
    # at first, so damage to its disk copy would only show once that copy is gone (see
    # test_stream's test of blocks served from memory, which damages one across a restart).
    monkeypatch.setattr(writer_module, "DIRECT_MIN", 1 << 62)
    data = payload(16 * BS, seed=21)
    info = info_of("d", data)
    key = FileKey.of(info)
    rng = random.Random(5)
    damaged = 0
    left: set[int] = set()  # damaged blocks left for the next service to find
    with FaultyOrigin({"d": data}) as origin:
        for restart in range(3):  # the same cache directory, a fresh service each time
            async with running(tmp_path) as service:
                stats = service.cache.statistics
                dropped_at_load = {i for i in left if not service.cache.has_block(key, i)}
                reader = open_reader(service, info, origin.url("d"))
                assert await read_all(reader, chunk=BS) == data  # checks every page of every block
                assert stats().corrupt_blocks == len(left - dropped_at_load)
                left.clear()
                for _ in range(60):
                    intact = [i for i in _blocks_on_disk(service, key) if i not in left]
                    if not intact:
                        break  # a truncation near the start took everything: on to the next service
                    index = rng.choice(intact)
                    damaged += 1
                    if restart < 2 and rng.random() < 0.3:
                        # Left for the next service; truncation and journal damage only show there.
                        kind = rng.choice(["flip", "zero", "swap", "truncate", "journal"])
                        _damage(service, key, index, rng, kind)
                        if kind == "truncate":
                            left |= set(range(index, key.size // BS))
                        elif kind != "journal":  # a damaged journal only makes the next load forget
                            left.add(index)
                        continue
                    _damage(service, key, index, rng, rng.choice(["flip", "zero", "swap"]))
                    corrupt = stats().corrupt_blocks
                    start = index * BS
                    again = open_reader(service, info, origin.url("d"))
                    assert await again.read(start, BS) == data[start : start + BS]
                    left.discard(index)
                    assert stats().corrupt_blocks == corrupt + 1
                    offset = rng.randrange(len(data))
                    if any(offset // BS <= i <= (offset + 200_000) // BS for i in left):
                        continue  # damage left for the next service is counted there
                    assert await reader.read(offset, 200_000) == data[offset : offset + 200_000]
                    assert stats().corrupt_blocks == corrupt + 1
    assert damaged >= 100
