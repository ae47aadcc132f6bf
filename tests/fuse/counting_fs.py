"""``python counting_fs.py [--plain] MOUNTPOINT``: files opened with direct I/O, so that every ``read()``
is a FUSE request, and a trio instrument that counts the steps of pyfuse3's request tasks.

``/file`` answers at once. A read of ``/slow`` waits (awaits) until ``/gate`` has been read: the
requests in between must be served by another task.

With our loop (``datalakefs.fuse.loop.install``, as the daemon runs it) unless ``--plain``. Prints
``ready`` once mounted and, after the unmount, one JSON line: ``{"reads": ..., "steps": ...}``.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys

import pyfuse3
import trio

from datalakefs.fuse import loop

SIZE = 1 << 20
INODES = {b"file": 2, b"slow": 3, b"gate": 4}


class OneFile(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.gate = trio.Event()

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = pyfuse3.InodeT(inode)
        entry.st_mode = pyfuse3.ModeT((stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644))
        entry.st_size = 0 if inode == pyfuse3.ROOT_INODE else SIZE
        entry.attr_timeout = entry.entry_timeout = 3600
        return entry

    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name not in INODES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(INODES[name])

    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), direct_io=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        if fh == INODES[b"slow"]:
            await self.gate.wait()
        elif fh == INODES[b"gate"]:
            self.gate.set()
        else:
            self.reads += 1
        return bytes(max(0, min(size, SIZE - off)))


class Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.startswith("pyfuse-"):
            self.steps += 1


def main(mountpoint: str, plain: bool) -> None:
    operations, steps = OneFile(), Steps()

    async def serve() -> None:
        if not plain:
            loop.install()
        await pyfuse3.main(min_tasks=1, max_tasks=64)  # as the daemon runs it

    pyfuse3.init(operations, mountpoint, {"fsname=countingfs", "subtype=countingfs"})
    print("ready", flush=True)
    try:
        trio.run(serve, instruments=[steps])
    finally:
        pyfuse3.close(unmount=False)
    print(json.dumps({"reads": operations.reads, "steps": steps.steps}), flush=True)


if __name__ == "__main__":
    main(sys.argv[-1], "--plain" in sys.argv)
    os._exit(0)
