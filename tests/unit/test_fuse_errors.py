"""What the pyfuse3 adapter makes of what the filesystem raises: an errno, logged as it deserves."""

from __future__ import annotations

import errno
import logging
from typing import Any, cast

import pyfuse3
import pytest

from datalakefs.errors import NotFoundError, TransferError
from datalakefs.fs.filesystem import Filesystem
from datalakefs.fuse.operations import FuseOperations


class _Stop(BaseException):
    """Stands for trio's Cancelled: not an Exception, so it must pass through untouched."""


class _Raising:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        raise self.error


def operations(error: BaseException) -> FuseOperations:
    return FuseOperations(cast(Filesystem, _Raising(error)), entry_timeout=1.0, attr_timeout=1.0)


async def read(error: BaseException) -> Any:
    return await operations(error).read(pyfuse3.FileHandleT(1), 0, 10)


async def test_a_filesystem_error_becomes_its_errno_and_a_quiet_one_is_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(pyfuse3.FUSEError) as caught:
        await read(NotFoundError("gone"))
    assert caught.value.errno == errno.ENOENT
    assert caplog.records == []
    with caplog.at_level(logging.WARNING), pytest.raises(pyfuse3.FUSEError) as caught:
        await read(TransferError("every replica failed"))
    assert caught.value.errno == errno.EIO
    assert [r.getMessage() for r in caplog.records] == ["read failed: every replica failed (EIO)"]


async def test_a_bug_is_eio_with_its_traceback_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as caught:
        await read(ValueError("a bug"))
    assert caught.value.errno == errno.EIO
    [record] = caplog.records
    assert record.getMessage() == "read failed unexpectedly"
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)


async def test_an_errno_and_a_cancellation_pass_through_untouched() -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await read(pyfuse3.FUSEError(errno.EAGAIN))
    assert caught.value.errno == errno.EAGAIN
    stop = _Stop()
    with pytest.raises(_Stop) as stopped:
        await read(stop)
    assert stopped.value is stop
