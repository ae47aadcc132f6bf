"""A mount whose daemon cannot answer any more is aborted, not waited on forever (is_stale)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from datalakefs.fuse.session import is_stale, mounted_fstype, unmount


def test_a_mount_that_never_answers_is_aborted_and_can_be_unmounted(hung_mount: Path) -> None:
    started = time.monotonic()
    assert is_stale(str(hung_mount), hung_after=1.0)
    assert time.monotonic() - started < 30  # the 1 s limit fired (ample slack), no endless wait
    with pytest.raises(OSError) as caught:
        os.statvfs(hung_mount)
    assert caught.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    unmount(str(hung_mount), lazy=True)
    assert mounted_fstype(str(hung_mount)) is None
