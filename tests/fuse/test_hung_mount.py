"""A mount whose daemon cannot answer any more is aborted, not waited on forever (is_stale)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datalakefs.fuse.session import is_stale, mounted_fstype, unmount


def test_a_mount_that_never_answers_is_aborted_and_can_be_unmounted(tmp_path: Path) -> None:
    mountpoint = tmp_path / "hung"
    mountpoint.mkdir()
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hung_fs.py")), str(mountpoint)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        started = time.monotonic()
        assert is_stale(str(mountpoint), hung_after=1.0)
        assert time.monotonic() - started < 30
        with pytest.raises(OSError) as caught:
            os.statvfs(mountpoint)
        assert caught.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        unmount(str(mountpoint), lazy=True)
        assert mounted_fstype(str(mountpoint)) is None
    finally:
        server.kill()
        server.wait(timeout=30)
        server.stdout.close()
        if mounted_fstype(str(mountpoint)) is not None:
            unmount(str(mountpoint), lazy=True)

