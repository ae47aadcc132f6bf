"""The ``/.outbox`` subtree as a filesystem: the one writable part of the mount (SPEC §5).

Layout::

    /.outbox/                      every visible scope of the lake
    /.outbox/<scope>/              the datasets being filled (``mkdir`` creates one)
    /.outbox/<scope>/<dataset>/    files being written or waiting for their upload

Files are 0644 and directories 0755; attributes are never cached by the kernel (``volatile``): a
file's size changes while it is written, and it leaves the outbox when its upload is done, which is
also pushed to the kernel through the ``invalidate_entry`` callback the FUSE layer provides.

Write calls: ``create``, ``open`` (``O_TRUNC`` empties the file), ``write``, ``truncate``; ``flush``
(every ``close()``), ``fsync`` and the last ``release`` commit the file durably (see
outbox/service.py); ``rename`` within a dataset directory renames it; ``unlink`` cancels its upload;
``rmdir`` removes an empty dataset directory; hard links and symlinks are ``EPERM``.
``user.datalakefs.state`` reads the upload state, and writing ``retry`` or ``cancel`` into it acts on
the upload (what ``datalakefs outbox retry|cancel`` does).

A file's inode is keyed by the file, not by its name, so that it keeps its inode across a rename.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from datalakefs.errors import (
    AlreadyExistsError,
    CrossDeviceError,
    InvalidNameError,
    NoAttributeError,
    NotFoundError,
    NotPermittedError,
    ReadOnlyError,
)
from datalakefs.fs.attributes import Attributes, Ownership
from datalakefs.fs.subtree import OpenMode
from datalakefs.model import DID
from datalakefs.namespace.inodes import ROOT_INODE, InodeTable, Node, NodeKind
from datalakefs.namespace.tree import DirEntries, Namespace
from datalakefs.outbox.files import OutboxFile
from datalakefs.outbox.service import Outbox

OUTBOX_DIR = ".outbox"
# asked for every entry of every readdir reply (Filesystem tells the outbox from the lake by it)
_OUTBOX_KINDS = frozenset({NodeKind.OUTBOX_ROOT, NodeKind.OUTBOX_SCOPE, NodeKind.OUTBOX_DATASET,
                           NodeKind.OUTBOX_FILE})
STATE_XATTR = "user.datalakefs.state"

#: ``invalidate_entry(parent_ino, name)``: tell the kernel a name is gone (set by the FUSE layer).
EntryInvalidator = Callable[[int, str], None]


@dataclass(slots=True)
class OutboxHandle:
    """An open outbox file. A write-only handle bypasses the kernel's page cache: the bytes go
    straight to the spool file instead of being copied into cache pages first (on this kind of VM,
    filling fresh pages is what writing costs; it halves the time to close() of a large file). A
    handle that can also read keeps the page cache, so that shared writable ``mmap`` (which needs
    ``O_RDWR``, and which FUSE refuses on direct-I/O files) works."""

    outbox: Outbox
    file: OutboxFile
    mode: OpenMode
    keep_cache: bool = False

    @property
    def direct_io(self) -> bool:
        return self.mode.write and not self.mode.readable

    async def read(self, offset: int, size: int) -> bytes:
        return self.outbox.read(self.file, offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        if not self.mode.write:
            raise ReadOnlyError("write: the file was opened read-only")
        return await self.outbox.write(self.file, offset, data)

    async def flush(self) -> None:
        """Every ``close()`` (and ``fsync()``): the bytes so far become durable and queued."""
        if self.mode.write:
            await self.outbox.commit(self.file)

    async def release(self) -> None:
        if self.mode.write:
            await self.outbox.close_for_writing(self.file)


class OutboxTree:
    """Nodes and calls of ``/.outbox`` over the :class:`Outbox` service."""

    def __init__(
        self,
        outbox: Outbox,
        namespace: Namespace,
        visible_scopes: Callable[[], Awaitable[list[str]]],
        owner: Ownership,
    ) -> None:
        self._outbox = outbox
        self._ns = namespace
        self._visible_scopes = visible_scopes
        self._owner = owner
        self._start = time.time()
        self.invalidate_entry: EntryInvalidator = lambda parent, name: None
        outbox.add_listener(self._uploaded)

    @property
    def _inodes(self) -> InodeTable:
        return self._ns.inodes

    def owns(self, node: Node) -> bool:
        return node.kind in _OUTBOX_KINDS

    # -- nodes -------------------------------------------------------------------------------------

    def root(self) -> Node:
        return self._node(NodeKind.OUTBOX_ROOT, ROOT_INODE, OUTBOX_DIR)

    def _scope(self, scope: str) -> Node:
        return self._node(NodeKind.OUTBOX_SCOPE, self.root().ino, scope, scope)

    def _dataset(self, scope: str, dataset: str) -> Node:
        return self._node(NodeKind.OUTBOX_DATASET, self._scope(scope).ino, dataset, scope)

    def _file(self, file: OutboxFile) -> Node:
        parent = self._dataset(file.scope, file.dataset)
        return self._node(NodeKind.OUTBOX_FILE, parent.ino, str(file.serial), file.scope)

    def renewed(self, node: Node) -> Node:
        """``node``, or the node it is interned as now if the kernel forgot it (see Subtree)."""
        return node if self._inodes.current(node) else self._node(node.kind, node.parent, node.label, node.scope)

    def _node(self, kind: NodeKind, parent: int, label: str, scope: str | None = None) -> Node:
        return self._inodes.intern((kind, scope, label), kind, parent, scope=scope, label=label)

    def outbox_file(self, node: Node) -> OutboxFile:
        if node.kind is not NodeKind.OUTBOX_FILE:
            raise NotFoundError(f"inode {node.ino} is not an outbox file")
        return self._outbox.file_by_serial(int(node.label))

    def attributes(self, node: Node) -> Attributes:
        if node.kind is NodeKind.OUTBOX_FILE:
            file = self.outbox_file(node)
            return Attributes(node.ino, self._owner.file_mode, file.size, file.mtime, file.mtime, 1, self._owner.uid,
                              self._owner.gid, volatile=True)
        return Attributes(node.ino, self._owner.dir_mode, 0, self._start, self._start, 2, self._owner.uid,
                          self._owner.gid, volatile=True)

    # -- names -------------------------------------------------------------------------------------

    async def lookup(self, parent: Node, name: str) -> Node:
        if parent.kind is NodeKind.OUTBOX_ROOT:
            if name in await self._visible_scopes():
                return self._scope(name)
        elif parent.kind is NodeKind.OUTBOX_SCOPE:
            assert parent.scope is not None
            if self._outbox.has_dataset(parent.scope, name):
                return self._dataset(parent.scope, name)
        elif parent.kind is NodeKind.OUTBOX_DATASET:
            assert parent.scope is not None
            return self._file(self._outbox.file(parent.scope, parent.label, name))
        raise NotFoundError(f"{OUTBOX_DIR}: no {name!r} in {parent.label}")

    async def list_dir(self, node: Node) -> DirEntries:
        if node.kind is NodeKind.OUTBOX_ROOT:
            scopes = await self._visible_scopes()
            return DirEntries(scopes, list(map(self._scope, scopes)))
        scope = node.scope
        assert scope is not None
        if node.kind is NodeKind.OUTBOX_SCOPE:
            datasets = self._outbox.datasets(scope)
            return DirEntries(datasets, [self._dataset(scope, d) for d in datasets])
        if node.kind is NodeKind.OUTBOX_DATASET:
            files = self._outbox.files(scope, node.label)
            return DirEntries([f.name for f in files], list(map(self._file, files)))
        raise NotFoundError(f"inode {node.ino} is not a directory")

    # -- directories -------------------------------------------------------------------------------

    async def mkdir(self, parent: Node, name: str) -> Node:
        if parent.kind is NodeKind.OUTBOX_ROOT:
            if name in await self._visible_scopes():
                raise AlreadyExistsError(f"{OUTBOX_DIR}/{name}")
            raise NotFoundError(f"{OUTBOX_DIR}/{name}: there is no scope {name!r} in the lake (scopes are made "
                                "by the Rucio admins; datasets are made here, as .outbox/<scope>/<dataset>)")
        if parent.kind is not NodeKind.OUTBOX_SCOPE:
            raise InvalidNameError(f"{OUTBOX_DIR}: directories are .outbox/<scope>/<dataset>, no deeper")
        assert parent.scope is not None
        await self._outbox.make_dataset(parent.scope, name)
        return self._dataset(parent.scope, name)

    async def rmdir(self, parent: Node, name: str) -> None:
        if parent.kind is not NodeKind.OUTBOX_SCOPE:
            raise ReadOnlyError(f"{OUTBOX_DIR}: only dataset directories can be removed")
        assert parent.scope is not None
        await self._outbox.remove_dataset(parent.scope, name)

    # -- files -------------------------------------------------------------------------------------

    async def create(self, parent: Node, name: str, mode: OpenMode) -> tuple[Node, OutboxHandle]:
        if parent.kind is not NodeKind.OUTBOX_DATASET:
            raise ReadOnlyError(f"{OUTBOX_DIR}: files go into .outbox/<scope>/<dataset>/")
        assert parent.scope is not None
        file = self._outbox.create(parent.scope, parent.label, name)
        await self._outbox.open_for_writing(file)
        return self._file(file), OutboxHandle(self._outbox, file, OpenMode(write=True, readable=mode.readable))

    async def open(self, node: Node, mode: OpenMode) -> OutboxHandle:
        file = self.outbox_file(node)
        if mode.write:
            await self._outbox.open_for_writing(file, mode.truncate)
        return OutboxHandle(self._outbox, file, mode)

    async def setattr(self, node: Node, size: int | None) -> None:
        """Only the size changes (truncate); mode and times are accepted without effect, as on many
        network filesystems (``tar -x``, ``cp -p``)."""
        if size is not None:
            await self._outbox.truncate(self.outbox_file(node), size)

    async def unlink(self, parent: Node, name: str) -> None:
        if parent.kind is not NodeKind.OUTBOX_DATASET:
            raise ReadOnlyError(f"{OUTBOX_DIR}: only files in .outbox/<scope>/<dataset>/ can be removed")
        assert parent.scope is not None
        await self._outbox.cancel(self._outbox.file(parent.scope, parent.label, name))

    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str, replace: bool) -> None:
        """Files within one dataset directory (rsync's, editors' and writers' temporary names);
        anything else is ``EXDEV``, so that ``mv`` copies instead."""
        if parent.kind is not NodeKind.OUTBOX_DATASET or new_parent.ino != parent.ino:
            raise CrossDeviceError(f"{OUTBOX_DIR}: files are renamed within their dataset directory only")
        assert parent.scope is not None
        await self._outbox.rename(self._outbox.file(parent.scope, parent.label, name), new_name, replace=replace)

    @staticmethod
    def refuse_link(what: str) -> NoReturn:
        raise NotPermittedError(f"{OUTBOX_DIR}: {what} is not supported (an upload is one regular file)")

    # -- extended attributes -----------------------------------------------------------------------

    def listxattr(self, node: Node) -> list[str]:
        return [STATE_XATTR] if node.kind is NodeKind.OUTBOX_FILE else []

    async def getxattr(self, node: Node, name: str) -> bytes:
        if name not in self.listxattr(node):
            raise NoAttributeError(name)
        return self.outbox_file(node).describe().encode()

    async def setxattr(self, node: Node, name: str, value: bytes) -> None:
        """``user.datalakefs.state`` = ``retry`` or ``cancel``: the control of ``datalakefs outbox``."""
        if name != STATE_XATTR or node.kind is not NodeKind.OUTBOX_FILE:
            raise ReadOnlyError(f"{name}: only {STATE_XATTR} of outbox files can be set")
        file = self.outbox_file(node)
        command = value.decode(errors="replace").strip()
        if command == "retry":
            await self._outbox.retry(file)
        elif command == "cancel":
            await self._outbox.cancel(file)
            self.invalidate_entry(self._dataset(file.scope, file.dataset).ino, file.name)
        else:
            raise InvalidNameError(f"{STATE_XATTR}: write 'retry' or 'cancel', not {command!r}")

    # -- after an upload ---------------------------------------------------------------------------

    def _uploaded(self, file: OutboxFile) -> None:
        """The file is in the lake now: drop the listings that miss it, and its outbox entry."""
        self._ns.forget_listing(DID(file.scope, file.dataset))
        self._ns.forget_scope_listing(file.scope)
        self.invalidate_entry(self._dataset(file.scope, file.dataset).ino, file.name)
