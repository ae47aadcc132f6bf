"""The inode table: stable inode numbers for the nodes the kernel knows about.

A node is created the first time a lookup or a listing shows it and lives until the kernel has
forgotten every reference to it (the FUSE lookup count falls to zero). No I/O happens here, and the
table is only touched from the trio thread.

Identity rules: a file is one inode whatever directory shows it (a file attached to two datasets has
one set of attributes); a directory is one inode per (parent, DID), because the kernel does not
tolerate one directory inode under two parents.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Hashable, Iterable
from typing import NamedTuple

from datalakefs.errors import NotFoundError
from datalakefs.model import DID, DIDInfo

ROOT_INODE = 1


class NodeKind(enum.Enum):
    ROOT = "root"
    SCOPE = "scope"
    COLLECTION = "collection"
    FILE = "file"
    CONTROL_DIR = "control-dir"
    CONTROL_FILE = "control-file"
    QUERY_ROOT = "query-root"
    QUERY_SCOPE = "query-scope"
    QUERY_RESULT = "query-result"
    OUTBOX_ROOT = "outbox-root"
    OUTBOX_SCOPE = "outbox-scope"
    OUTBOX_DATASET = "outbox-dataset"
    OUTBOX_FILE = "outbox-file"

    @property
    def is_dir(self) -> bool:
        return self not in (NodeKind.FILE, NodeKind.CONTROL_FILE, NodeKind.OUTBOX_FILE)


class Node(NamedTuple):
    """One inode. ``scope`` is the scope its children are named relative to; ``label`` is the
    node's own name where it has no DID (a scope, a control file, a query filter).

    A tuple, not a frozen dataclass (which sets each field through ``object.__setattr__``): a cold
    ``ls -l`` of 100,000 files makes 100,000 of them."""

    ino: int
    kind: NodeKind
    parent: int
    did: DID | None = None
    info: DIDInfo | None = None
    scope: str | None = None
    label: str = ""


class InodeTable:
    """Maps inode numbers to nodes and counts the kernel's references to each."""

    def __init__(self) -> None:
        self._nodes: dict[int, Node] = {}
        self._by_key: dict[Hashable, int] = {}
        # the key of each node that is not keyed by its own DID (file nodes are, and a listing of
        # 100,000 files would keep 100,000 more entries here)
        self._keys: dict[int, Hashable] = {}
        self._lookups: dict[int, int] = {}
        self._derived: dict[int, object] = {}
        self._next = itertools.count(ROOT_INODE + 1)
        root = Node(ROOT_INODE, NodeKind.ROOT, ROOT_INODE)
        self._nodes[ROOT_INODE] = root

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, ino: object) -> bool:
        return ino in self._nodes

    def get(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise NotFoundError(f"inode {ino} is not known (forgotten)") from None

    def info_of(self, ino: int) -> DIDInfo | None:
        """The catalogue facts of node ``ino``; None when it has none or is not known (forgotten)."""
        node = self._nodes.get(ino)
        return None if node is None else node.info

    def intern(self, key: Hashable, kind: NodeKind, parent: int, did: DID | None = None,
               info: DIDInfo | None = None, scope: str | None = None, label: str = "") -> Node:
        """The node for ``key``: the known one, or ``Node(<a fresh inode number>, kind, parent, did,
        info, scope, label)`` (the fields as arguments, not a factory: a listing interns every entry).

        A known node whose catalogue facts arrive later (its ``info`` was ``None``) is updated.
        """
        ino = self._by_key.get(key)
        if ino is not None:
            node = self._nodes[ino]
            if node.info is None and info is not None:
                node = self._nodes[ino] = node._replace(info=info)
                self._derived.pop(ino, None)
            return node
        ino = next(self._next)
        node = self._nodes[ino] = Node(ino, kind, parent, did, info, scope, label)
        self._by_key[key] = ino
        if key is not did:
            self._keys[ino] = key
        return node

    def derived(self, ino: int) -> object | None:
        """What the layer above derived from the node and kept with it (:meth:`keep_derived`), or None."""
        return self._derived.get(ino)

    def keep_derived(self, ino: int, value: object) -> None:
        """Keep ``value``, derived from node ``ino`` alone (its attributes), as long as that node lives:
        it is dropped when the node is forgotten or replaced, so it never outlives what it came from."""
        if ino in self._nodes:
            self._derived[ino] = value

    def current(self, node: Node) -> bool:
        """``node`` is the table's node for its inode (not forgotten, not replaced by a newer one)."""
        return self._nodes.get(node.ino) is node

    def remember(self, ino: int, count: int = 1) -> None:
        """The kernel took ``count`` more references (a lookup, or an entry of readdirplus)."""
        if ino != ROOT_INODE:
            self._lookups[ino] = self._lookups.get(ino, 0) + count

    def remember_each(self, inos: Iterable[int]) -> None:
        """One more reference to each of ``inos`` (the entries of a readdirplus reply)."""
        lookups = self._lookups
        for ino in inos:
            if ino != ROOT_INODE:
                lookups[ino] = lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` references; the node goes when none are left."""
        if ino == ROOT_INODE or ino not in self._lookups:
            return
        left = self._lookups[ino] - count
        if left > 0:
            self._lookups[ino] = left
            return
        del self._lookups[ino]
        node = self._nodes.pop(ino)
        self._derived.pop(ino, None)
        del self._by_key[self._keys.pop(ino, node.did)]

    def lookup_count(self, ino: int) -> int:
        return self._lookups.get(ino, 0)
