"""The pyfuse3 adapter's readdir: entries built by the filesystem's keeping, references counted for
the entries the reply holds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import pyfuse3
import pytest

from datalakefs.fs.attributes import Attributes
from datalakefs.fs.filesystem import Filesystem
from datalakefs.fuse.operations import FuseOperations


class _Listed:
    """Three entries; what readdir built and what was remembered."""

    def __init__(self) -> None:
        self.kept: dict[int, Any] = {}
        self.remembered: list[int] = []

    async def readdir(self, fh: int, start: int, build: Callable[[Attributes], Any]
                      ) -> Iterator[tuple[int, str, int, Any]]:
        return self._entries(start, build)

    def _entries(self, start: int, build: Callable[[Attributes], Any]) -> Iterator[tuple[int, str, int, Any]]:
        for index in range(start, 3):
            ino = 10 + index
            if ino not in self.kept:
                self.kept[ino] = build(Attributes(ino, 0o100644, 100 + index, 1.5, 1.5, 1, 7, 8))
            yield index + 1, f"f{index}\udcff", ino, self.kept[ino]

    def remember_each(self, inos: Iterable[int]) -> None:
        self.remembered += inos


async def test_only_the_entries_the_reply_holds_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    listed = _Listed()
    operations = FuseOperations(cast(Filesystem, listed), entry_timeout=5.0, attr_timeout=6.0)
    replied: list[tuple[bytes, int, int, float, int]] = []
    room = [2]  # entries the kernel's buffer holds, per request

    def reply(token: object, name: bytes, entry: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if not room[0]:
            return False
        room[0] -= 1
        replied.append((name, entry.st_ino, entry.st_size, entry.attr_timeout, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    await operations.readdir(pyfuse3.FileHandleT(1), 0, cast(pyfuse3.ReaddirToken, None))
    assert replied == [(b"f0\xff", 10, 100, 6.0, 1), (b"f1\xff", 11, 101, 6.0, 2)]
    assert listed.remembered == [10, 11]
    room[0] = 2
    await operations.readdir(pyfuse3.FileHandleT(1), 2, cast(pyfuse3.ReaddirToken, None))
    assert replied[2][:3] == (b"f2\xff", 12, 102) and listed.remembered == [10, 11, 12]


class _Forgetting:
    def __init__(self) -> None:
        self.forgotten: list[tuple[int, int]] = []

    def forget(self, ino: int, count: int) -> None:
        if ino == 13:
            raise KeyError(ino)
        self.forgotten.append((ino, count))


async def test_a_bug_in_forget_is_logged_and_the_rest_are_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    """FORGET has no reply: what it raises would end pyfuse3's session loop, and with it the mount."""
    forgetting = _Forgetting()
    operations = FuseOperations(cast(Filesystem, forgetting), entry_timeout=5.0, attr_timeout=6.0)
    inodes = [(pyfuse3.InodeT(12), 1), (pyfuse3.InodeT(13), 1), (pyfuse3.InodeT(14), 2)]
    await operations.forget(inodes)
    assert forgetting.forgotten == [(12, 1), (14, 2)]
    [record] = caplog.records
    assert record.getMessage() == "forget of inode 13 failed unexpectedly" and record.exc_info is not None
