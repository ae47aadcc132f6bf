"""pyfuse3's request loop as the daemon drives it (datalakefs/fuse/loop.py): one pass through trio's
scheduler per FUSE request, counted by a trio instrument in a real mount (tests/fuse/counting_fs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from datalakefs.fuse.session import unmount
from tests.fuse.mounting import kill_and_unmount

READS = 400
#: requests other than the READs: INIT, LOOKUP, OPEN, FLUSH, RELEASE and a few the kernel may add
OTHER_REQUESTS = 20


def steps_and_reads(mountpoint: Path, *flags: str, while_one_waits: bool = False) -> tuple[int, int]:
    """Mount counting_fs, make READS reads of 4 KiB (``while_one_waits``: while a read of /slow waits
    in its handler, until /gate is read after them), unmount; its count of steps and reads."""
    script = str(Path(__file__).with_name("counting_fs.py"))
    server = subprocess.Popen([sys.executable, script, *flags, str(mountpoint)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        slow = threading.Thread(target=read_one, args=(mountpoint / "slow",), daemon=True)
        if while_one_waits:
            slow.start()
        fd = os.open(mountpoint / "file", os.O_RDONLY)
        try:
            for k in range(READS):
                assert len(os.pread(fd, 4096, k % 256 * 4096)) == 4096
        finally:
            os.close(fd)
        if while_one_waits:
            read_one(mountpoint / "gate")
            slow.join(timeout=30)
            assert not slow.is_alive()
        unmount(str(mountpoint))
        out, _ = server.communicate(timeout=30)
    finally:
        kill_and_unmount(server, mountpoint)
    counts = json.loads(out.strip().splitlines()[-1])
    return counts["steps"], counts["reads"]


def read_one(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        assert len(os.pread(fd, 4096, 0)) == 4096
    finally:
        os.close(fd)


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def test_one_scheduler_pass_per_request(mountpoint: Path) -> None:
    steps, reads = steps_and_reads(mountpoint)
    assert reads == READS
    assert steps <= READS + OTHER_REQUESTS


def test_pyfuse3_alone_takes_two_passes_per_request(mountpoint: Path) -> None:
    """What loop.py removes (and proof that the counting sees it): pyfuse3's own read lock checkpoints."""
    steps, reads = steps_and_reads(mountpoint, "--plain")
    assert reads == READS
    assert steps >= 2 * READS


def test_requests_are_served_while_a_handler_waits(mountpoint: Path) -> None:
    """A handler that awaits ends its task's step: the spare task takes the lock and serves the rest."""
    steps, reads = steps_and_reads(mountpoint, while_one_waits=True)
    assert reads == READS
    assert steps <= READS + OTHER_REQUESTS + 10
