"""The FUSE ceiling: a minimal read-only pyfuse3 passthrough of a local directory.

``python -m bench.passthrough SOURCE MOUNTPOINT`` serves SOURCE with the settings datalakefs uses
(inline ``os.pread`` in the handler, ``keep_cache``, 1 h entry/attribute timeouts, the mount's
``read_ahead_kb`` raised to 1024 after INIT, pyfuse3's request loop run as ``datalakefs/fuse/loop.py``
runs it: one scheduler pass per request, not pyfuse3's own two), and nothing else: what any pyfuse3 +
trio filesystem can reach on this machine. It runs in the foreground until unmounted or sent
SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

from datalakefs.fuse import loop
from datalakefs.fuse.session import raise_read_ahead

TIMEOUT = 3600.0
READ_AHEAD_KB = 1024


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self._inodes: dict[int, int] = {os.stat(source).st_ino: pyfuse3.ROOT_INODE}
        self._fds: dict[int, int] = {}
        self.initialized = trio.Event()

    def init(self) -> None:
        self.initialized.set()

    def _ino(self, path: str, st: os.stat_result) -> int:
        ino = self._inodes.setdefault(st.st_ino, st.st_ino + 1)  # keep the root's number free
        self._paths[ino] = path
        return ino

    def _entry(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = pyfuse3.InodeT(ino)
        entry.entry_timeout = entry.attr_timeout = TIMEOUT
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(entry, name, getattr(st, name))
        entry.st_blksize = 1 << 20
        return entry

    def _stat(self, path: str) -> os.stat_result:
        try:
            return os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = os.path.join(self._paths[parent_inode], os.fsdecode(name))
        st = self._stat(path)
        return self._entry(self._ino(path, st), st)

    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(inode, self._stat(self._paths[inode]))

    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        names = sorted(os.listdir(self._paths[fh]))
        for index in range(start_id, len(names)):
            path = os.path.join(self._paths[fh], names[index])
            st = self._stat(path)
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), self._entry(self._ino(path, st), st),
                                         index + 1):
                return

    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        path = self._paths[inode]
        if not stat.S_ISREG(self._stat(path).st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        fd = os.open(path, os.O_RDONLY)
        self._fds[fd] = inode
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fd), keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self._fds.pop(fh, None)
        os.close(fh)


async def _serve(ops: Passthrough, mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        async def after_init() -> None:
            await ops.initialized.wait()
            await trio.sleep(0.05)
            raise_read_ahead(mountpoint, READ_AHEAD_KB)

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(after_init)
        nursery.start_soon(on_signal)
        loop.install()
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.passthrough SOURCE MOUNTPOINT", file=sys.stderr)
        return 2
    source, mountpoint = (os.path.realpath(a) for a in argv)
    ops = Passthrough(source)
    pyfuse3.init(ops, mountpoint, {"fsname=bench-passthrough", "ro", "default_permissions"})
    try:
        trio.run(_serve, ops, mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
