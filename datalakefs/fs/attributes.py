"""Attributes of nodes as the kernel will see them (SPEC §2).

Every node has the mount's :class:`Ownership`: owned by the mounting user (or the ``uid``/``gid``
options), files ``0666``, directories ``0777`` less the ``umask`` option (default 0644/0755), and no
write bit anywhere on a read-only (``ro``) mount. The owner's write bit on the lake's files is not a
promise that writes work (they get EROFS outside the outbox): under ``default_permissions`` the kernel
lets only a writer set a ``user.*`` extended attribute, and ``user.datalakefs.stage`` is a request
the owner must be able to make. Size is the catalogue's ``bytes``; times are the DID's creation and
update times. Control files report size 0 and are read with direct I/O, so their content may change
from one open to the next.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import NamedTuple

from datalakefs.model import DIDInfo
from datalakefs.namespace.inodes import Node, NodeKind


@dataclass(frozen=True, slots=True)
class Ownership:
    """Owner, group and permission bits of every node of one mount (see the module docstring).
    The modes are worked out once: every entry of a listing asks for one."""

    uid: int
    gid: int
    umask: int = 0o022
    read_only: bool = False
    file_mode: int = field(init=False)
    dir_mode: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "file_mode", stat.S_IFREG | self._permissions(0o666))
        object.__setattr__(self, "dir_mode", stat.S_IFDIR | self._permissions(0o777))

    def _permissions(self, full: int) -> int:
        allowed = full & ~self.umask
        return allowed & ~0o222 if self.read_only else allowed


class Attributes(NamedTuple):
    """A tuple, not a frozen dataclass, which is built field by field through ``object.__setattr__``:
    the first ``ls -l`` of 100,000 entries builds 100,000 of these, and :func:`attributes_of` took
    0.14 s for them with a dataclass, 0.08 s with a tuple."""

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


def attributes_of(node: Node, owner: Ownership, start_time: float, directory: DIDInfo | None = None) -> Attributes:
    """The attributes of ``node``. Its times are its DID's; an entry of a listing too large to ask
    every entry's times for has none and shows ``directory``'s (the DID of the directory that listed
    it); virtual nodes and DIDs without known times show the mount's start time."""
    info = node.info
    timed = info if info is not None and info.created_at else directory
    mtime = (timed.updated_at or timed.created_at) if timed else 0.0
    ctime = timed.created_at if timed else 0.0
    if not mtime:
        mtime = ctime = start_time
    if node.kind.is_dir:
        return Attributes(node.ino, owner.dir_mode, 0, mtime, ctime, 2, owner.uid, owner.gid)
    size = (info.size or 0) if node.kind is NodeKind.FILE and info is not None else 0
    return Attributes(node.ino, owner.file_mode, size, mtime, ctime, 1, owner.uid, owner.gid)
