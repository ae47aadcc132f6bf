"""Stream mode against a real XrdHttp origin (XRootD 5.5 with its range-reply quirks)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.faults.harness import BS, info_of, open_reader, payload, read_all, running
from tests.faults.xrootd import XrootdOrigin

pytestmark = pytest.mark.skipif(not XrootdOrigin.available(), reason="xrootd is not installed")

DATA = payload(24 * BS + 12345, seed=31)  # the last block is short: no range may pass the end


async def test_sequential_and_random_reads_from_xrdhttp(tmp_path: Path) -> None:
    info = info_of("f.bin", DATA)
    with XrootdOrigin({"f.bin": DATA}) as origin:
        async with running(tmp_path) as service:
            reader = open_reader(service, info, origin.url("f.bin"))
            assert await read_all(reader) == DATA
            assert service.statistics().verified_files == 1
            await service.clear()
            rng = random.Random(3)
            for _ in range(100):
                offset = rng.randrange(len(DATA))
                size = rng.randrange(1, 3 * BS)
                assert await reader.read(offset, size) == DATA[offset : offset + size]
            tail = open_reader(service, info, origin.url("f.bin"))
            assert await tail.read(len(DATA) - 10, 100) == DATA[-10:]
            assert service.statistics().failed_requests == 0
