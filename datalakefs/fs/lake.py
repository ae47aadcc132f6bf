"""The lake as a subtree of the mount: every POSIX call on the catalogue's DIDs, read-only.

* Catalogue calls happen only on cache misses of the cached catalogue; ``getxattr`` of a name we do
  not define is answered without any call.
* Anything that would change the lake raises ``ReadOnlyError`` (EROFS); only the outbox is
  writable (fs/outbox.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.errors import ChecksumMismatchError, NoAttributeError, NotFoundError, NotSupportedError, ReadOnlyError
from datalakefs.fs.attributes import Attributes, Ownership, attributes_of
from datalakefs.fs.ports import FileContent, OpenFile, StageRequests
from datalakefs.fs.prefetch import ListingPrefetch
from datalakefs.fs.subtree import FileHandle, OpenMode
from datalakefs.model import DIDInfo, DIDType, ReadBuffer
from datalakefs.namespace.inodes import Node, NodeKind
from datalakefs.namespace.tree import Entries, Namespace

ControlRenderer = Callable[[], bytes]
#: ``forget_pages(ino)``: make the kernel drop the pages it keeps of a file (set by the FUSE layer).
PageInvalidator = Callable[[int], None]

_USER_NAMESPACE = "user."
# Set (any value) on /<mount>/.datalakefs to drop every cached block: how `datalakefs cache clear`
# reaches a running daemon.
CLEAR_CACHE_XATTR = "user.datalakefs.cache.clear"
_DID_XATTRS = ("user.rucio.scope", "user.rucio.name", "user.rucio.did_type")
_FILE_XATTRS = ("user.rucio.adler32", "user.rucio.md5", "user.rucio.replicas",
                "user.datalakefs.cached", "user.datalakefs.state")
_COLLECTION_XATTRS = ("user.datalakefs.state",)
STAGE_XATTR = "user.datalakefs.stage"


def refuse_write(what: str) -> NoReturn:
    raise ReadOnlyError(f"{what}: the lake is read-only outside .outbox")


@dataclass(slots=True)
class _ControlHandle:
    """A control file (status.json ...): its content as rendered at open, read with direct I/O."""

    content: bytes
    keep_cache: bool = False
    direct_io: bool = True

    async def read(self, offset: int, size: int) -> bytes:
        return self.content[offset : offset + size]

    async def write(self, offset: int, data: bytes) -> int:
        refuse_write("write")

    async def flush(self) -> None:
        pass

    async def release(self) -> None:
        pass


@dataclass(slots=True)
class _LakeFileHandle:
    """A file of the lake, read through the content service."""

    opened: OpenFile
    node: Node
    #: how many times each file failed its whole-file checksum (the tree's count, shared)
    mismatches: dict[int, int]
    mismatched: PageInvalidator
    #: the kernel's pages of the file are from a copy that failed its checksum: this open drops them
    drop_kept_pages: bool = False
    direct_io: bool = False
    mismatches_at_open: int = 0

    @property
    def keep_cache(self) -> bool:
        return self.opened.keep_cache and not self.drop_kept_pages

    async def read(self, offset: int, size: int) -> ReadBuffer:
        # The check can fail on a request the caller did not make (the kernel's read-ahead, whose
        # error it drops), and the bytes read before it came from the bad copy: every later read of
        # this open fails too, else the caller would get the rest fetched anew and no error at all.
        if self.mismatches and self.mismatches.get(self.node.ino, 0) != self.mismatches_at_open:
            raise ChecksumMismatchError(
                f"{self.node.did}: the file failed its checksum while open; reads of this open fail "
                "(a new open reads it anew)"
            )
        try:
            return await self.opened.read(offset, size)
        except ChecksumMismatchError:
            self.mismatched(self.node.ino)
            raise

    async def write(self, offset: int, data: bytes) -> int:
        refuse_write("write")

    async def flush(self) -> None:
        pass

    async def release(self) -> None:
        await self.opened.close()


class LakeTree:
    """The read-only part of the mount: scopes, collections, files, queries, control files."""

    def __init__(
        self,
        namespace: Namespace,
        catalogue: CachedCatalogue,
        content: FileContent,
        control_files: dict[str, ControlRenderer],
        owner: Ownership | None = None,
        stager: StageRequests | None = None,
        prefetch: ListingPrefetch | None = None,
    ) -> None:
        self._ns = namespace
        self._catalogue = catalogue
        self._content = content
        self._stager = stager
        self._prefetch = prefetch
        self._control = control_files
        self._owner = owner or Ownership(os.getuid(), os.getgid())
        self._start = time.time()
        self.forget_pages: PageInvalidator = lambda ino: None
        self._pages_to_drop: set[int] = set()
        self._mismatches: dict[int, int] = {}

    def owns(self, node: Node) -> bool:
        return True

    def attributes(self, node: Node) -> Attributes:
        """A lake node's never change while it lives: readdir keeps what the FUSE layer builds from
        them (fs/filesystem.py)."""
        info = node.info
        directory = self._ns.inodes.info_of(node.parent) if info is not None and not info.created_at else None
        return attributes_of(node, self._owner, self._start, directory)

    async def lookup(self, parent: Node, name: str) -> Node:
        return await self._ns.lookup(parent, name)

    async def list_dir(self, node: Node) -> Entries:
        return await self._ns.list_dir(node)

    def renewed(self, node: Node) -> Node:
        return self._ns.renewed(node)

    # -- files -------------------------------------------------------------------------------

    async def open(self, node: Node, mode: OpenMode) -> FileHandle:
        if mode.write:
            raise ReadOnlyError(f"{node.label or node.did} is read-only (write only into .outbox)")
        if node.kind is NodeKind.CONTROL_FILE:
            return _ControlHandle(self._control[node.label]())
        if node.kind is not NodeKind.FILE or node.info is None:
            raise NotFoundError(f"inode {node.ino} is not a file")
        opened = _LakeFileHandle(await self._content.open(node.info, mode.nonblocking), node, self._mismatches,
                                 self._mismatched, drop_kept_pages=node.ino in self._pages_to_drop,
                                 mismatches_at_open=self._mismatches.get(node.ino, 0))
        self._pages_to_drop.discard(node.ino)
        if self._prefetch is not None:
            self._follow(node, node.info)
        return opened

    def _mismatched(self, ino: int) -> None:
        """File ``ino`` failed its whole-file checksum. The reads before gave the kernel pages of the bad
        copy, which it keeps across opens (keep_cache): they are dropped now, for readers that keep
        their descriptor, and at the file's next open for certain (the drop runs on its own thread),
        so that a retry reads the file anew and checks it again. Its opens until then fail every read.
        """
        self._mismatches[ino] = self._mismatches.get(ino, 0) + 1
        self._pages_to_drop.add(ino)
        self.forget_pages(ino)

    def _follow(self, node: Node, info: DIDInfo) -> None:
        """Tell the prefetch about an open, when the directory's listing is at hand (no catalogue call)."""
        assert self._prefetch is not None
        try:
            directory = self._ns.inodes.get(node.parent)
        except NotFoundError:
            return  # the kernel forgot the directory: nothing to follow
        listed = self._ns.listed(directory)
        if listed is not None:
            self._prefetch.opened(node.parent, info, listed)

    # -- extended attributes ---------------------------------------------------------------

    def listxattr(self, node: Node) -> list[str]:
        if node.did is None:
            return []
        return list(_DID_XATTRS + (_FILE_XATTRS if node.kind is NodeKind.FILE else _COLLECTION_XATTRS))

    async def getxattr(self, node: Node, name: str) -> bytes:
        if not name.startswith(_USER_NAMESPACE):
            # Security labels and POSIX ACLs do not exist here. EOPNOTSUPP (not ENODATA) lets `ls -l`
            # remember that for the whole mount after one call instead of asking twice per file.
            raise NotSupportedError(name)
        if name not in self.listxattr(node):
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
            if info.md5 is None and info.type is DIDType.FILE:  # a dataset's listing (list_files) has none
                info = await self._catalogue.get_info(info.did)
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

    async def setxattr(self, node: Node, name: str, value: bytes) -> None:
        """Requests, not writes: ``user.datalakefs.stage`` on a DID stages it by rule, and
        ``CLEAR_CACHE_XATTR`` on the control directory clears the block cache; anything else is
        EROFS."""
        if node.kind is NodeKind.CONTROL_DIR and name == CLEAR_CACHE_XATTR:
            await self._content.clear()
        elif name == STAGE_XATTR and self._stager is not None and node.info is not None:
            await self._stager.stage(node.info, value)
        else:
            refuse_write("setxattr")

    # -- changes: refused ---------------------------------------------------------------------

    async def create(self, parent: Node, name: str, mode: OpenMode) -> tuple[Node, FileHandle]:
        refuse_write("create")

    async def setattr(self, node: Node, size: int | None) -> None:
        refuse_write("setattr")

    async def mkdir(self, parent: Node, name: str) -> Node:
        refuse_write("mkdir")

    async def rmdir(self, parent: Node, name: str) -> None:
        refuse_write("rmdir")

    async def unlink(self, parent: Node, name: str) -> None:
        refuse_write("unlink")

    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str, replace: bool) -> None:
        refuse_write("rename")

    def refuse_link(self, what: str) -> NoReturn:
        refuse_write(what)
