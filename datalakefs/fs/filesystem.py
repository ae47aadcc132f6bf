"""The read side of the filesystem: every POSIX call on the lake, in domain terms.

Contracts the FUSE layer relies on:
* ``lookup`` and each entry returned by ``readdir`` add one kernel reference to the node
  (``remember``); ``forget`` drops them. Nodes without references may disappear.
* Errors are :class:`~datalakefs.errors.DatalakeError` subclasses carrying the errno.
* Catalogue calls happen only on cache misses of the cached catalogue; ``getxattr`` of a name we do
  not define is answered without any call.
* Anything that would change the lake outside the outbox raises ``ReadOnlyError`` (EROFS); the
  ``/.outbox`` subtree and its write calls are :class:`~datalakefs.fs.outbox.OutboxTree`'s.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.errors import NoAttributeError, NotFoundError, NotSupportedError, ReadOnlyError
from datalakefs.fs.attributes import Attributes, Ownership, attributes_of
from datalakefs.fs.outbox import OUTBOX_DIR, OutboxHandle, OutboxTree
from datalakefs.fs.ports import FileContent, OpenFile, StageRequests
from datalakefs.model import DIDInfo
from datalakefs.namespace.inodes import ROOT_INODE, Node, NodeKind
from datalakefs.namespace.tree import Namespace

log = logging.getLogger(__name__)

ControlRenderer = Callable[[], bytes]

_USER_NAMESPACE = "user."
# Set (any value) on /<mount>/.datalakefs to drop every cached block: how `datalakefs cache clear`
# reaches a running daemon.
CLEAR_CACHE_XATTR = "user.datalakefs.cache.clear"
_DID_XATTRS = ("user.rucio.scope", "user.rucio.name", "user.rucio.did_type")
_FILE_XATTRS = ("user.rucio.adler32", "user.rucio.md5", "user.rucio.replicas",
                "user.datalakefs.cached", "user.datalakefs.state")
_COLLECTION_XATTRS = ("user.datalakefs.state",)
STAGE_XATTR = "user.datalakefs.stage"


@dataclass(frozen=True, slots=True)
class Entry:
    """A name in a directory with the attributes the kernel caches for it."""

    name: str
    attributes: Attributes


@dataclass(slots=True)
class _DirHandle:
    entries: list[tuple[str, Node]]


@dataclass(slots=True)
class _ControlHandle:
    content: bytes


class Filesystem:
    """The lake as a filesystem. One instance per mount, used from the trio thread only."""

    def __init__(
        self,
        namespace: Namespace,
        catalogue: CachedCatalogue,
        content: FileContent,
        control_files: dict[str, ControlRenderer],
        owner: Ownership | None = None,
        stager: StageRequests | None = None,
        outbox: OutboxTree | None = None,
    ) -> None:
        self._ns = namespace
        self._catalogue = catalogue
        self._content = content
        self._stager = stager
        self._control = control_files
        self._owner = owner or Ownership(os.getuid(), os.getgid())
        self._start = time.time()
        self._outbox = outbox
        self._handles: dict[int, _DirHandle | _ControlHandle | OutboxHandle | OpenFile] = {}
        self._next_fh = itertools.count(1)

    # -- names and attributes -------------------------------------------------------------

    def attributes(self, node: Node) -> Attributes:
        if self._outbox is not None and self._outbox.owns(node):
            return self._outbox.attributes(node)
        return attributes_of(node, self._owner, self._start)

    async def lookup(self, parent_ino: int, name: str) -> Attributes:
        if name in (".", ".."):
            raise NotFoundError(name)
        parent = self._ns.inodes.get(parent_ino)
        if self._outbox is None:
            node = await self._ns.lookup(parent, name)
        elif parent_ino == ROOT_INODE and name == OUTBOX_DIR:
            node = self._outbox.root()
        elif self._outbox.owns(parent):
            node = await self._outbox.lookup(parent, name)
        else:
            node = await self._ns.lookup(parent, name)
        self._ns.inodes.remember(node.ino)
        return self.attributes(node)

    def forget(self, ino: int, count: int) -> None:
        self._ns.inodes.forget(ino, count)

    def remember(self, ino: int) -> None:
        self._ns.inodes.remember(ino)

    async def getattr(self, ino: int) -> Attributes:
        return self.attributes(self._ns.inodes.get(ino))

    # -- directories ------------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        node = self._ns.inodes.get(ino)
        if self._outbox is not None and self._outbox.owns(node):
            entries = await self._outbox.list_dir(node)
        else:
            entries = await self._ns.list_dir(node)
            if ino == ROOT_INODE and self._outbox is not None:
                entries.insert(0, (OUTBOX_DIR, self._outbox.root()))
        return self._new_handle(_DirHandle(entries))

    def readdir(self, fh: int, start: int) -> Iterator[tuple[int, Entry]]:
        """Entries from position ``start``; each item carries the position to resume after it.

        The caller must ``remember`` each entry it hands to the kernel."""
        handle = self._handles[fh]
        assert isinstance(handle, _DirHandle)
        for index in range(start, len(handle.entries)):
            name, node = handle.entries[index]
            yield index + 1, Entry(name, self.attributes(node))

    # -- files -------------------------------------------------------------------------------

    async def open(self, ino: int, write: bool, nonblocking: bool, readable: bool = True) -> tuple[int, bool, bool]:
        """Open a file; returns (handle, keep_cache, direct_io)."""
        node = self._ns.inodes.get(ino)
        if self._outbox is not None and self._outbox.owns(node):
            return self._new_handle(self._outbox.open(node, write)), False, _outbox_direct_io(write, readable)
        if write:
            raise ReadOnlyError(f"{node.label or node.did} is read-only (write only into .outbox)")
        if node.kind is NodeKind.CONTROL_FILE:
            content = self._control[node.label]()
            return self._new_handle(_ControlHandle(content)), False, True
        if node.kind is not NodeKind.FILE or node.info is None:
            raise NotFoundError(f"inode {ino} is not a file")
        opened = await self._content.open(node.info, nonblocking)
        return self._new_handle(opened), opened.keep_cache, False

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handles[fh]
        if isinstance(handle, _ControlHandle):
            return handle.content[offset : offset + size]
        if isinstance(handle, OutboxHandle):
            return self._outbox_tree().read(handle, offset, size)
        assert not isinstance(handle, _DirHandle)
        return await handle.read(offset, size)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, OutboxHandle):
            self._outbox_tree().release(handle)
        elif handle is not None and not isinstance(handle, _DirHandle | _ControlHandle):
            await handle.close()

    def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- extended attributes ---------------------------------------------------------------

    def listxattr(self, ino: int) -> list[str]:
        node = self._ns.inodes.get(ino)
        if self._outbox is not None and self._outbox.owns(node):
            return self._outbox.listxattr(node)
        if node.did is None:
            return []
        return list(_DID_XATTRS + (_FILE_XATTRS if node.kind is NodeKind.FILE else _COLLECTION_XATTRS))

    async def getxattr(self, ino: int, name: str) -> bytes:
        node = self._ns.inodes.get(ino)
        if self._outbox is not None and self._outbox.owns(node):
            return self._outbox.getxattr(node, name)
        if not name.startswith(_USER_NAMESPACE):
            # Security labels and POSIX ACLs do not exist here. EOPNOTSUPP (not ENODATA) lets `ls -l`
            # remember that for the whole mount after one call instead of asking twice per file.
            raise NotSupportedError(name)
        if name not in self.listxattr(ino):
            raise NoAttributeError(name)
        assert node.info is not None
        value = await self._xattr_value(node.info, name)
        return value.encode()

    async def _xattr_value(self, info: DIDInfo, name: str) -> str:
        if name == "user.rucio.scope":
            return info.did.scope
        if name == "user.rucio.name":
            return info.did.name
        if name == "user.rucio.did_type":
            return info.type.value
        if name == "user.rucio.adler32":
            return info.adler32 or ""
        if name == "user.rucio.md5":
            return info.md5 or ""
        if name == "user.rucio.replicas":
            replicas = await self._catalogue.list_replicas([info.did])
            rses = [r.rse for found in replicas for r in found.replicas]
            return ",".join(dict.fromkeys(rses))
        if name == "user.datalakefs.cached":
            return str(self._content.cached_bytes(info))
        if self._stager is not None:
            await self._stager.look_up(info)
        return self._content.state(info)

    # -- writes (the outbox; read-only elsewhere) ---------------------------------------------

    async def setxattr(self, ino: int, name: str, value: bytes) -> None:
        """Requests, not writes: ``user.datalakefs.stage`` on a DID stages it by rule, and
        ``CLEAR_CACHE_XATTR`` on the control directory clears the block cache; in the outbox, the
        outbox's own (retry, cancel); anything else is EROFS."""
        node = self._ns.inodes.get(ino)
        if self._outbox is not None and self._outbox.owns(node):
            await self._outbox.setxattr(node, name, value)
        elif node.kind is NodeKind.CONTROL_DIR and name == CLEAR_CACHE_XATTR:
            await self._content.clear()
        elif name == STAGE_XATTR and self._stager is not None and node.info is not None:
            await self._stager.stage(node.info, value)
        else:
            self.refuse_write("setxattr")

    def refuse_write(self, what: str) -> NoReturn:
        raise ReadOnlyError(f"{what}: the lake is read-only outside .outbox")

    def _outbox_tree(self) -> OutboxTree:
        if self._outbox is None:
            self.refuse_write("write")
        return self._outbox

    def _outbox_node(self, ino: int, what: str) -> tuple[OutboxTree, Node]:
        node = self._ns.inodes.get(ino)
        if self._outbox is None or not self._outbox.owns(node):
            self.refuse_write(what)
        return self._outbox, node

    async def mkdir(self, parent_ino: int, name: str) -> Attributes:
        outbox, parent = self._outbox_node(parent_ino, "mkdir")
        node = await outbox.mkdir(parent, name)
        self._ns.inodes.remember(node.ino)
        return self.attributes(node)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        outbox, parent = self._outbox_node(parent_ino, "rmdir")
        await outbox.rmdir(parent, name)

    async def create(self, parent_ino: int, name: str, readable: bool = True) -> tuple[int, Attributes, bool]:
        """Create an outbox file; returns (handle, attributes, direct_io)."""
        outbox, parent = self._outbox_node(parent_ino, "create")
        node, handle = outbox.create(parent, name)
        self._ns.inodes.remember(node.ino)
        return self._new_handle(handle), self.attributes(node), _outbox_direct_io(True, readable)

    async def unlink(self, parent_ino: int, name: str) -> None:
        outbox, parent = self._outbox_node(parent_ino, "unlink")
        await outbox.unlink(parent, name)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handles[fh]
        if not isinstance(handle, OutboxHandle) or not handle.write:
            self.refuse_write("write")
        return self._outbox_tree().write(handle, offset, data)

    async def flush(self, fh: int) -> None:
        """Every close() of a descriptor; for outbox files it commits (see fs/outbox.py)."""
        handle = self._handles.get(fh)
        if isinstance(handle, OutboxHandle):
            await self._outbox_tree().flush(handle)

    async def fsync(self, fh: int) -> None:
        await self.flush(fh)

    async def setattr(self, ino: int, size: int | None) -> Attributes:
        """Only the size of outbox files can change (truncate); their other attributes are fixed
        and requests to change them are accepted without effect, as on many network filesystems."""
        outbox, node = self._outbox_node(ino, "setattr")
        if size is not None:
            await outbox.truncate(node, size)
        return self.attributes(node)

    def _new_handle(self, handle: _DirHandle | _ControlHandle | OutboxHandle | OpenFile) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = handle
        return fh


def _outbox_direct_io(write: bool, readable: bool) -> bool:
    """Write-only outbox handles bypass the kernel's page cache: the bytes go straight to the spool
    file instead of being copied into cache pages first (on this kind of VM, filling fresh pages is
    what writing costs; it halves the time to close() of a large file). A handle that can also read
    keeps the page cache, so that shared writable ``mmap`` (which needs ``O_RDWR``, and which FUSE
    refuses on direct-I/O files) works."""
    return write and not readable
