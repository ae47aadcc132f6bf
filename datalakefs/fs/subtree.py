"""The two parts of the mount's tree, the read-only lake and the writable outbox, behind one protocol.

:class:`~datalakefs.fs.filesystem.Filesystem` picks the subtree that owns a node once per call and
hands the call to it; each subtree answers every call, refusing those it does not support with the
errno that says why (``EROFS`` in the lake, ``EPERM`` for links in the outbox).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn, Protocol

from datalakefs.fs.attributes import Attributes
from datalakefs.model import ReadBuffer
from datalakefs.namespace.inodes import Node
from datalakefs.namespace.tree import Entries


@dataclass(frozen=True, slots=True)
class OpenMode:
    """How a file is opened: for writing, readable too, ``O_NONBLOCK``, ``O_TRUNC``."""

    write: bool = False
    readable: bool = True
    nonblocking: bool = False
    truncate: bool = False


class FileHandle(Protocol):
    """An open file of either subtree."""

    @property
    def keep_cache(self) -> bool:
        """The kernel may keep the file's pages across opens."""
        ...

    @property
    def direct_io(self) -> bool:
        """Reads and writes bypass the kernel's page cache."""
        ...

    async def read(self, offset: int, size: int) -> ReadBuffer: ...

    async def write(self, offset: int, data: bytes) -> int: ...

    async def flush(self) -> None:
        """Every ``close()`` of a descriptor, and ``fsync``."""
        ...

    async def release(self) -> None:
        """The last descriptor of the open file is gone."""
        ...


class Subtree(Protocol):
    def owns(self, node: Node) -> bool: ...

    def attributes(self, node: Node) -> Attributes: ...

    async def lookup(self, parent: Node, name: str) -> Node: ...

    async def list_dir(self, node: Node) -> Entries: ...

    def renewed(self, node: Node) -> Node:
        """``node`` while the inode table has it; once the kernel forgot it (a directory handle's
        entry, listed before), the node it is interned as now, with a new inode number."""

    async def open(self, node: Node, mode: OpenMode) -> FileHandle: ...

    async def create(self, parent: Node, name: str, mode: OpenMode) -> tuple[Node, FileHandle]: ...

    async def setattr(self, node: Node, size: int | None) -> None:
        """``size``: truncate; other attributes are accepted without effect where changes are."""
        ...

    async def mkdir(self, parent: Node, name: str) -> Node: ...

    async def rmdir(self, parent: Node, name: str) -> None: ...

    async def unlink(self, parent: Node, name: str) -> None: ...

    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str, replace: bool) -> None: ...

    def refuse_link(self, what: str) -> NoReturn:
        """``link``, ``symlink``, ``mknod``: never supported."""
        ...

    def listxattr(self, node: Node) -> list[str]: ...

    async def getxattr(self, node: Node, name: str) -> bytes: ...

    async def setxattr(self, node: Node, name: str, value: bytes) -> None: ...
