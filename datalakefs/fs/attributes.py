"""Attributes of nodes as the kernel will see them (SPEC §2).

Files are 0444, directories 0555, owned by the mounting user; size is the catalogue's ``bytes``;
times are the DID's creation and update times. Control files report size 0 and are read with
direct I/O, so their content may change from one open to the next.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from datalakefs.namespace.inodes import Node, NodeKind

FILE_MODE = stat.S_IFREG | 0o444
DIR_MODE = stat.S_IFDIR | 0o555


@dataclass(frozen=True, slots=True)
class Attributes:
    ino: int
    mode: int
    size: int
    mtime: float
    ctime: float
    nlink: int
    uid: int
    gid: int
    #: the kernel must not cache these attributes (outbox files change size and disappear)
    volatile: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def attributes_of(node: Node, uid: int, gid: int, start_time: float) -> Attributes:
    """The attributes of ``node``; virtual nodes carry the mount's start time."""
    info = node.info
    mtime = (info.updated_at or info.created_at) if info else 0.0
    ctime = info.created_at if info else 0.0
    if not mtime:
        mtime = ctime = start_time
    if node.kind.is_dir:
        return Attributes(node.ino, DIR_MODE, 0, mtime, ctime, 2, uid, gid)
    size = (info.size or 0) if node.kind is NodeKind.FILE and info is not None else 0
    return Attributes(node.ino, FILE_MODE, size, mtime, ctime, 1, uid, gid)
