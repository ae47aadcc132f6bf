"""The filesystem: every POSIX call of the mount, in domain terms, routed to the subtree that owns
the node (fs/subtree.py): the read-only lake (fs/lake.py) or the outbox (fs/outbox.py).

Contracts the FUSE layer relies on:
* ``lookup`` and each entry returned by ``readdir`` add one kernel reference to the node
  (``remember``); ``forget`` drops them. Nodes without references may disappear.
* Errors are :class:`~datalakefs.errors.DatalakeError` subclasses carrying the errno; a file handle
  the filesystem does not know is ``EBADF``.
* Anything that would change the lake outside the outbox raises ``ReadOnlyError`` (EROFS).
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, NoReturn, TypeVar, cast

import trio

from datalakefs.background import Background
from datalakefs.errors import BadHandleError, DatalakeError, InvalidArgumentError, NotFoundError
from datalakefs.fs.attributes import Attributes
from datalakefs.fs.lake import CLEAR_CACHE_XATTR, LakeTree, refuse_write
from datalakefs.fs.outbox import OUTBOX_DIR, OutboxTree
from datalakefs.fs.subtree import FileHandle, OpenMode, Subtree
from datalakefs.model import ReadBuffer
from datalakefs.namespace.inodes import ROOT_INODE, Node
from datalakefs.namespace.tree import DirEntries, Entries, Namespace

# cli/cache.py sets it on a mount (the name is the lake's: fs/lake.py)
__all__ = ["CLEAR_CACHE_XATTR", "Filesystem"]

Entry = TypeVar("Entry")
log = logging.getLogger(__name__)

#: entries built ahead at a time (a few ms) before the trio loop may serve a request
AHEAD_STEP: Final = 1000


@dataclass(slots=True)
class _DirHandle:
    entries: Entries
    #: the task building this handle's entries ahead of the kernel's requests (cancelled at releasedir)
    ahead: trio.CancelScope | None = None


class Filesystem:
    """The mount as a filesystem. One instance per mount, used from the trio thread only."""

    def __init__(self, namespace: Namespace, lake: LakeTree, outbox: OutboxTree | None = None) -> None:
        self._ns = namespace
        self._lake = lake
        self._outbox = outbox
        self._handles: dict[int, _DirHandle | FileHandle] = {}
        self._next_fh = itertools.count(1)
        self._ahead = Background()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build directory entries ahead of the kernel's requests (:meth:`readdir`) until cancelled
        (the daemon's services nursery); without it, each entry is built when the kernel asks."""
        await self._ahead.run(task_status=task_status)

    def _tree(self, node: Node) -> Subtree:
        """The one place that tells the outbox from the lake."""
        if self._outbox is not None and self._outbox.owns(node):
            return self._outbox
        return self._lake

    def _node_tree(self, ino: int) -> tuple[Node, Subtree]:
        node = self._ns.inodes.get(ino)
        return node, self._tree(node)

    # -- names and attributes -------------------------------------------------------------

    def attributes(self, node: Node) -> Attributes:
        return self._tree(node).attributes(node)

    async def lookup(self, parent_ino: int, name: str) -> Attributes:
        if name in (".", ".."):
            raise NotFoundError(name)
        parent, tree = self._node_tree(parent_ino)
        if parent_ino == ROOT_INODE and name == OUTBOX_DIR and self._outbox is not None:
            node = self._outbox.root()
        else:
            node = await tree.lookup(parent, name)
        self._ns.inodes.remember(node.ino)
        return self.attributes(node)

    def forget(self, ino: int, count: int) -> None:
        self._ns.inodes.forget(ino, count)

    def remember(self, ino: int) -> None:
        self._ns.inodes.remember(ino)

    def remember_each(self, inos: Iterable[int]) -> None:
        """One more kernel reference to each of ``inos`` (the entries of one readdir reply)."""
        self._ns.inodes.remember_each(inos)

    async def getattr(self, ino: int) -> Attributes:
        return self.attributes(self._ns.inodes.get(ino))

    # -- directories ------------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        node, tree = self._node_tree(ino)
        entries = await tree.list_dir(node)
        if ino == ROOT_INODE and self._outbox is not None:
            entries = DirEntries([OUTBOX_DIR, *entries.names], [self._outbox.root(), *entries.nodes])
        return self._new_handle(_DirHandle(entries))

    async def readdir(
        self, fh: int, start: int, build: Callable[[Attributes], Entry]
    ) -> Iterator[tuple[int, str, int, Entry]]:
        """Entries from position ``start``: the position to resume after each, its name, its inode
        and what ``build`` makes of its attributes (the FUSE layer's entry for the kernel). A listing
        still arriving from the catalogue gives the entries it holds so far; when it holds none from
        ``start`` on yet, this waits for them (an empty answer would end the kernel's reading); its
        error when it broke off before ``start``. One mount has one ``build``, its FUSE adapter's:
        what it builds for a node whose attributes cannot change while it lives (the lake's, not the
        outbox's volatile ones) is kept with the node, so a warm ``ls -l`` of 100,000 entries builds
        none (building them was most of its readdir time).

        A directory whose entry at ``start`` is not built yet (a cold one) has the rest built ahead
        while :meth:`run` runs (:meth:`_build_ahead`): as ``ls`` works through one reply, which takes
        it about as long as building the reply took us, the next ones are built, and as the listing
        arrives, so are its entries; the kernel's next request only copies them.

        The caller must ``remember`` each entry it hands to the kernel."""
        handle = self._handle(fh)
        assert isinstance(handle, _DirHandle)
        entries = handle.entries
        end = await entries.ready(start)
        if handle.ahead is None and end > start and self._ns.inodes.derived(entries.nodes[start].ino) is None:
            handle.ahead = trio.CancelScope()
            self._ahead.start_soon(self._build_ahead, handle, handle.ahead, start, build)
        return self._entries(entries, start, end, build)

    async def _build_ahead(self, handle: _DirHandle, scope: trio.CancelScope, position: int,
                           build: Callable[[Attributes], Entry]) -> None:
        """Build (and keep) the handle's entries from ``position`` on as its listing arrives, in steps
        of :data:`AHEAD_STEP` between which the loop serves requests (and the thread parsing the
        answer gets the GIL); until the listing is whole and built, the handle is released, or the
        listing breaks off (its reader gets that error itself)."""
        entries = handle.entries
        with scope:
            try:
                while (end := await entries.ready(position)) > position:
                    while position < end:
                        step = min(position + AHEAD_STEP, end)
                        collections.deque(self._entries(entries, position, step, build), maxlen=0)
                        position = step
                        await trio.lowlevel.checkpoint()
            except DatalakeError:
                return
            except Exception:  # the background must not take the mount down; readdir builds what is left
                log.error("building directory entries ahead failed unexpectedly", exc_info=True)

    def _entries(
        self, entries: Entries, start: int, end: int, build: Callable[[Attributes], Entry]
    ) -> Iterator[tuple[int, str, int, Entry]]:
        inodes = self._ns.inodes
        kept, keep, current = inodes.derived, inodes.keep_derived, inodes.current
        names, nodes = entries.names, entries.nodes
        for index in range(start, end):
            node = nodes[index]
            built = kept(node.ino)  # kept only while a node lives at that inode, and built from it
            if built is None:
                if not current(node):  # the kernel forgot it since it was listed: never hand out a dead inode
                    node = nodes[index] = self._tree(node).renewed(node)
                attributes = self._tree(node).attributes(node)
                built = build(attributes)
                if not attributes.volatile:
                    keep(node.ino, built)
            yield index + 1, names[index], node.ino, cast(Entry, built)

    def releasedir(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _DirHandle) and handle.ahead is not None:
            handle.ahead.cancel()

    # -- files -------------------------------------------------------------------------------

    async def open(self, ino: int, write: bool, nonblocking: bool, readable: bool = True,
                   truncate: bool = False) -> tuple[int, bool, bool]:
        """Open a file (``truncate``: ``O_TRUNC``); returns (handle, keep_cache, direct_io)."""
        node, tree = self._node_tree(ino)
        handle = await tree.open(node, OpenMode(write, readable, nonblocking, truncate))
        return self._new_handle(handle), handle.keep_cache, handle.direct_io

    async def create(self, parent_ino: int, name: str, readable: bool = True) -> tuple[int, Attributes, bool]:
        """Create a file; returns (handle, attributes, direct_io)."""
        parent, tree = self._node_tree(parent_ino)
        node, handle = await tree.create(parent, name, OpenMode(write=True, readable=readable))
        self._ns.inodes.remember(node.ino)
        return self._new_handle(handle), self.attributes(node), handle.direct_io

    def _handle(self, fh: int) -> _DirHandle | FileHandle:
        try:
            return self._handles[fh]
        except KeyError:
            raise BadHandleError(f"file handle {fh} is not open") from None

    def _file_handle(self, fh: int) -> FileHandle:
        handle = self._handle(fh)
        if isinstance(handle, _DirHandle):
            raise BadHandleError(f"file handle {fh} is a directory's")
        return handle

    async def read(self, fh: int, offset: int, size: int) -> ReadBuffer:
        return await self._file_handle(fh).read(offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        return await self._file_handle(fh).write(offset, data)

    async def flush(self, fh: int) -> None:
        """Every close() of a descriptor; for outbox files it commits (see fs/outbox.py)."""
        await self._file_handle(fh).flush()

    async def fsync(self, fh: int) -> None:
        await self.flush(fh)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and not isinstance(handle, _DirHandle):
            await handle.release()

    async def setattr(self, ino: int, size: int | None) -> Attributes:
        """Only the size of outbox files can change (truncate); their other attributes are fixed
        and requests to change them are accepted without effect, as on many network filesystems."""
        node, tree = self._node_tree(ino)
        await tree.setattr(node, size)
        return self.attributes(node)

    # -- extended attributes ---------------------------------------------------------------

    def listxattr(self, ino: int) -> list[str]:
        node, tree = self._node_tree(ino)
        return tree.listxattr(node)

    async def getxattr(self, ino: int, name: str) -> bytes:
        node, tree = self._node_tree(ino)
        return await tree.getxattr(node, name)

    async def setxattr(self, ino: int, name: str, value: bytes) -> None:
        """Requests, not writes: staging and cache clearing in the lake (fs/lake.py), retry and
        cancel in the outbox; anything else is EROFS."""
        node, tree = self._node_tree(ino)
        await tree.setxattr(node, name, value)

    # -- names ----------------------------------------------------------------------------------

    def refuse_write(self, what: str) -> NoReturn:
        refuse_write(what)

    async def mkdir(self, parent_ino: int, name: str) -> Attributes:
        parent, tree = self._node_tree(parent_ino)
        node = await tree.mkdir(parent, name)
        self._ns.inodes.remember(node.ino)
        return self.attributes(node)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        parent, tree = self._node_tree(parent_ino)
        await tree.rmdir(parent, name)

    async def unlink(self, parent_ino: int, name: str) -> None:
        parent, tree = self._node_tree(parent_ino)
        await tree.unlink(parent, name)

    async def rename(self, parent_ino: int, name: str, new_parent_ino: int, new_name: str, *,
                     replace: bool = True, exchange: bool = False) -> None:
        """Within the outbox only (fs/outbox.py); ``RENAME_EXCHANGE`` is not supported."""
        parent, tree = self._node_tree(parent_ino)
        new_parent = self._ns.inodes.get(new_parent_ino)
        if exchange and tree is not self._lake:
            raise InvalidArgumentError("rename: RENAME_EXCHANGE is not supported")
        await tree.rename(parent, name, new_parent, new_name, replace)

    def refuse_link(self, parent_ino: int, what: str) -> NoReturn:
        """``link``, ``symlink``, ``mknod``: EPERM in the outbox (not supported), EROFS elsewhere."""
        _, tree = self._node_tree(parent_ino)
        tree.refuse_link(what)

    def _new_handle(self, handle: _DirHandle | FileHandle) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = handle
        return fh
