"""pyfuse3 ``Operations`` over :class:`~datalakefs.fs.filesystem.Filesystem`.

Each handler converts arguments (bytes names → ``str`` with ``surrogateescape``), calls the
filesystem, converts the result, and maps errors: a ``DatalakeError`` becomes its errno; anything
unexpected is logged with its traceback and becomes ``EIO``, so a bug never takes the mount down.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import NoReturn

import pyfuse3
import trio

from datalakefs.errors import DatalakeError
from datalakefs.fs.attributes import Attributes
from datalakefs.fs.filesystem import Filesystem
from datalakefs.model import ReadBuffer

log = logging.getLogger(__name__)

#: renameat2(2) flags (linux/fs.h)
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2

#: what ``os.fsencode`` encodes with, without its type checks per name
_FS_ENCODING = sys.getfilesystemencoding()

_QUIET_ERRNOS = frozenset({errno.ENOENT, errno.ENODATA, errno.EOPNOTSUPP, errno.EROFS, errno.EAGAIN})


def invalidate_entry(parent_ino: int, name: str) -> None:
    """Tell the kernel that ``name`` left directory ``parent_ino`` (safe inside request handlers:
    pyfuse3 queues it to its own thread)."""
    pyfuse3.invalidate_entry_async(pyfuse3.InodeT(parent_ino), os.fsencode(name), ignore_enoent=True)


def forget_pages(ino: int) -> None:
    """Make the kernel drop the pages it keeps of file ``ino``. On a thread of its own: the kernel holds
    the pages of the read being answered locked until the reply, which the caller has yet to send."""

    def invalidate() -> None:
        with contextlib.suppress(OSError):  # ENOENT: the kernel forgot the inode already
            pyfuse3.invalidate_inode(pyfuse3.InodeT(ino), attr_only=False)

    threading.Thread(target=invalidate, name="datalakefs-forget-pages", daemon=True).start()


def _readable(flags: int) -> bool:
    return flags & os.O_ACCMODE != os.O_WRONLY


class _ErrorsAsErrno:
    """``with _ErrorsAsErrno(operation):`` maps what the filesystem raises to a ``FUSEError``.

    A class, not a ``contextlib.contextmanager``: a generator made and driven per request was a few
    per cent of the daemon's time on a warm read of small files (four requests per file)."""

    __slots__ = ("operation",)

    def __init__(self, operation: str) -> None:
        self.operation = operation

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None or isinstance(exc, pyfuse3.FUSEError) or not isinstance(exc, Exception):
            return  # success, already an errno, or trio's cancellation and the like
        if isinstance(exc, DatalakeError):
            if exc.errno not in _QUIET_ERRNOS:
                log.warning("%s failed: %s (%s)", self.operation, exc, errno.errorcode.get(exc.errno, exc.errno))
            raise pyfuse3.FUSEError(exc.errno) from exc
        log.error("%s failed unexpectedly", self.operation, exc_info=exc)
        raise pyfuse3.FUSEError(errno.EIO) from exc


class FuseOperations(pyfuse3.Operations):
    """Thin adapter: no decisions are made here."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem, entry_timeout: float, attr_timeout: float, xattrs: bool = True) -> None:
        super().__init__()
        # Without xattrs, ENOSYS makes the kernel stop asking: `ls -l` then costs no per-file
        # getxattr round trips (coreutils asks for two per file).
        self._xattrs = xattrs
        self._fs = fs
        self._entry_timeout = entry_timeout
        self._attr_timeout = attr_timeout
        self.initialized = trio.Event()

    def init(self) -> None:
        """Called by pyfuse3 once the kernel's INIT request is handled."""
        self.initialized.set()

    def _entry(self, attrs: Attributes) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = pyfuse3.InodeT(attrs.ino)  # generation: 0, pyfuse3's default
        entry.entry_timeout = 0 if attrs.volatile else self._entry_timeout
        entry.attr_timeout = 0 if attrs.volatile else self._attr_timeout
        entry.st_mode = pyfuse3.ModeT(attrs.mode)
        entry.st_nlink = attrs.nlink
        entry.st_uid = attrs.uid
        entry.st_gid = attrs.gid
        entry.st_size = attrs.size
        entry.st_blksize = 1 << 20
        entry.st_blocks = (attrs.size + 511) // 512
        entry.st_mtime_ns = int(attrs.mtime * 1e9)
        entry.st_ctime_ns = int(attrs.ctime * 1e9)
        entry.st_atime_ns = entry.st_mtime_ns
        return entry

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _ErrorsAsErrno("lookup"):
            return self._entry(await self._fs.lookup(parent_inode, os.fsdecode(name)))

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        """FORGET has no reply: an error raised here would end pyfuse3's session loop, and the mount."""
        for ino, count in inode_list:
            try:
                self._fs.forget(ino, count)
            except Exception:
                log.error("forget of inode %d failed unexpectedly", ino, exc_info=True)

    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _ErrorsAsErrno("getattr"):
            return self._entry(await self._fs.getattr(inode))

    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        with _ErrorsAsErrno("opendir"):
            return pyfuse3.FileHandleT(await self._fs.opendir(inode))

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Each entry's ``EntryAttributes`` is built once per node and kept by the filesystem
        (``readdir_reply`` copies it into the reply); the kernel's references are counted once the
        reply is full, for the entries it holds. A listing still arriving answers with the entries it
        holds, fewer than fit: the kernel asks again from the next position."""
        with _ErrorsAsErrno("readdir"):
            replied = []
            reply = pyfuse3.readdir_reply
            for next_id, name, ino, entry in await self._fs.readdir(fh, start_id, self._entry):
                if not reply(token, name.encode(_FS_ENCODING, "surrogateescape"), entry, next_id):
                    break
                replied.append(ino)
            self._fs.remember_each(replied)

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._fs.releasedir(fh)

    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        with _ErrorsAsErrno("open"):
            write = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
            # libfuse hands O_TRUNC to open (atomic_o_trunc): the filesystem empties the file
            fh, keep_cache, direct_io = await self._fs.open(inode, write, bool(flags & os.O_NONBLOCK),
                                                            readable=_readable(flags),
                                                            truncate=bool(flags & os.O_TRUNC))
            return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=keep_cache, direct_io=direct_io)

    # pyfuse3 types read as bytes but replies with any buffer, before its task awaits again (ReadBuffer)
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> ReadBuffer:  # type: ignore[override]
        with _ErrorsAsErrno("read"):
            return await self._fs.read(fh, off, size)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        with _ErrorsAsErrno("release"):
            await self._fs.release(fh)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        with _ErrorsAsErrno("write"):
            return await self._fs.write(fh, off, buf)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        with _ErrorsAsErrno("flush"):
            await self._fs.flush(fh)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        with _ErrorsAsErrno("fsync"):
            await self._fs.fsync(fh)

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if not self._xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        with _ErrorsAsErrno("getxattr"):
            return await self._fs.getxattr(inode, os.fsdecode(name))

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        if not self._xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        with _ErrorsAsErrno("listxattr"):
            return [pyfuse3.XAttrNameT(os.fsencode(n)) for n in self._fs.listxattr(inode)]

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = 1 << 20
        stats.f_namemax = 255
        return stats

    # Calls that change things: the filesystem allows them in the outbox only (EROFS elsewhere).

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        with _ErrorsAsErrno("setattr"):
            return self._entry(await self._fs.setattr(inode, attr.st_size if fields.update_size else None))

    def _refuse(self, what: str) -> NoReturn:
        try:
            self._fs.refuse_write(what)
        except DatalakeError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc

    async def mknod(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: pyfuse3.ModeT,
                    rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _ErrorsAsErrno("mknod"):
            self._fs.refuse_link(parent_inode, "mknod")

    async def mkdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: pyfuse3.ModeT,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _ErrorsAsErrno("mkdir"):
            return self._entry(await self._fs.mkdir(parent_inode, os.fsdecode(name)))

    async def create(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: pyfuse3.ModeT,
                     flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        with _ErrorsAsErrno("create"):
            fh, attrs, direct_io = await self._fs.create(parent_inode, os.fsdecode(name), readable=_readable(flags))
            return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=direct_io), self._entry(attrs)

    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        with _ErrorsAsErrno("unlink"):
            await self._fs.unlink(parent_inode, os.fsdecode(name))

    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    ctx: pyfuse3.RequestContext) -> None:
        with _ErrorsAsErrno("rmdir"):
            await self._fs.rmdir(parent_inode, os.fsdecode(name))

    async def rename(self, parent_inode_old: pyfuse3.InodeT, name_old: pyfuse3.FileNameT,
                     parent_inode_new: pyfuse3.InodeT, name_new: pyfuse3.FileNameT, flags: pyfuse3.FlagT,
                     ctx: pyfuse3.RequestContext) -> None:
        with _ErrorsAsErrno("rename"):
            await self._fs.rename(parent_inode_old, os.fsdecode(name_old), parent_inode_new, os.fsdecode(name_new),
                                  replace=not flags & _RENAME_NOREPLACE, exchange=bool(flags & _RENAME_EXCHANGE))

    async def symlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                      target: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _ErrorsAsErrno("symlink"):
            self._fs.refuse_link(parent_inode, "symlink")

    async def link(self, inode: pyfuse3.InodeT, new_parent_inode: pyfuse3.InodeT,
                   new_name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _ErrorsAsErrno("link"):
            self._fs.refuse_link(new_parent_inode, "link")

    async def setxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        with _ErrorsAsErrno("setxattr"):
            await self._fs.setxattr(inode, os.fsdecode(name), value)

    async def removexattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                          ctx: pyfuse3.RequestContext) -> None:
        self._refuse("removexattr")
