"""The directory tree over the catalogue: lookups and listings in terms of nodes.

Layout (SPEC §2)::

    /                      scopes (optionally filtered), plus .datalakefs/ and .query/
    /<scope>/              the scope's collections; any DID of the scope resolves by name
    /<scope>/<collection>/ its content; children of another scope appear as ``scope:name``
    /.query/<scope>/<filter>/  DIDs matching a metadata filter or a name wildcard
    /.datalakefs/          control files (their content is the filesystem layer's business)

Every catalogue call goes through the cached catalogue. The tree keeps one more thing: a per-directory
listing with its name index (DIDInfos, never nodes, so a forgotten inode is never handed out again),
for ``listing_ttl`` — the same TTL as the catalogue's — so a lookup in a large directory is a dict access.
Nothing here counts kernel references: the filesystem layer does, when it hands nodes to the kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from cachetools import TTLCache

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.errors import InvalidNameError, NotFoundError
from datalakefs.gcpause import gc_paused
from datalakefs.model import DID, DIDInfo, DIDType
from datalakefs.namespace.escaping import component_for_scope, components_for, did_for, is_shortened, scope_for
from datalakefs.namespace.inodes import ROOT_INODE, InodeTable, Node, NodeKind

CONTROL_DIR = ".datalakefs"
#: the control file with the mount's options (the daemon renders it; the command line reads it)
CONFIG_FILE = "config.json"
QUERY_DIR = ".query"

_LISTED_KINDS = frozenset({NodeKind.SCOPE, NodeKind.COLLECTION, NodeKind.QUERY_RESULT})


class DirEntries(NamedTuple):
    """A directory's entries in order, as parallel sequences (a pair per entry cost 64 bytes each: 6 MB
    for 100,000). ``names`` may be shared with a cached listing: never change it; ``nodes`` is the
    caller's own."""

    names: Sequence[str]
    nodes: list[Node]


@dataclass(slots=True)
class _Listing:
    """Names and infos in listing order, as parallel sequences: a 100,000-entry listing kept as
    pairs held a tuple per entry."""

    names: list[str]
    infos: tuple[DIDInfo, ...]
    by_name: dict[str, DIDInfo]
    #: the entries' nodes (parallel to ``names``), built by the first ``list_dir`` under parent inode
    #: ``children_of``
    children: list[Node] = field(default_factory=list)
    children_of: int = 0


class Namespace:
    """Resolves names to nodes and lists directories, creating nodes in the inode table."""

    def __init__(
        self,
        catalogue: CachedCatalogue,
        inodes: InodeTable,
        scopes: Sequence[str] = (),
        control_files: Sequence[str] = (),
        listing_ttl: float = 300.0,
        listing_cache_size: int = 256,
        times_limit: int = 1000,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._catalogue = catalogue
        self._inodes = inodes
        self._scope_filter = frozenset(scopes)
        self._control_files = tuple(control_files)
        self._times_limit = times_limit
        self._listings: TTLCache[tuple[object, ...], _Listing] = TTLCache(
            maxsize=listing_cache_size, ttl=listing_ttl, timer=timer
        )

    @property
    def inodes(self) -> InodeTable:
        return self._inodes

    async def lookup(self, parent: Node, component: str) -> Node:
        """The child ``component`` of ``parent``; ``NotFoundError`` when there is none."""
        kind = parent.kind
        if kind is NodeKind.ROOT:
            return await self._lookup_root(component)
        if kind is NodeKind.SCOPE:
            return await self._lookup_in_scope(parent, component)
        if kind is NodeKind.QUERY_SCOPE:
            return await self._query_node(parent, component)
        if kind is NodeKind.CONTROL_DIR:
            if component in self._control_files:
                return self._control_file(component)
            raise NotFoundError(f"{CONTROL_DIR}/{component}")
        return await self._lookup_listed(parent, component)

    async def list_dir(self, node: Node) -> DirEntries:
        """The entries of a directory node, in a stable order (no ``.``/``..``)."""
        kind = node.kind
        if kind is NodeKind.ROOT:
            scopes = await self._visible_scopes()
            return DirEntries([CONTROL_DIR, QUERY_DIR, *map(component_for_scope, scopes)],
                              [self._control_dir(), self._query_root(), *map(self._scope_node, scopes)])
        if kind in _LISTED_KINDS:
            listing = await self._listing(node)
            return DirEntries(listing.names, self._children(node, listing))
        if kind is NodeKind.QUERY_ROOT:
            scopes = await self._visible_scopes()
            return DirEntries(list(map(component_for_scope, scopes)), list(map(self._query_scope, scopes)))
        if kind is NodeKind.QUERY_SCOPE:
            return DirEntries([], [])
        if kind is NodeKind.CONTROL_DIR:
            return DirEntries(self._control_files, list(map(self._control_file, self._control_files)))
        raise NotFoundError(f"inode {node.ino} is not a directory")

    async def _visible_scopes(self) -> list[str]:
        scopes = await self._catalogue.list_scopes()
        if self._scope_filter:
            scopes = [s for s in scopes if s in self._scope_filter]
        return scopes

    async def _lookup_root(self, component: str) -> Node:
        if component == CONTROL_DIR:
            return self._control_dir()
        if component == QUERY_DIR:
            return self._query_root()
        try:
            scope = scope_for(component)
        except InvalidNameError:
            raise NotFoundError(f"no scope {component!r}") from None
        if scope in await self._visible_scopes():
            return self._scope_node(scope)
        raise NotFoundError(f"no scope {component!r}")

    async def _lookup_in_scope(self, parent: Node, component: str) -> Node:
        """Any DID of the scope resolves, listed or not (SPEC §2)."""
        assert parent.scope is not None
        if is_shortened(component):
            return await self._lookup_listed(parent, component)
        try:
            did = did_for(component, parent.scope)
        except InvalidNameError:
            raise NotFoundError(f"{component!r} cannot name a DID") from None
        info = await self._catalogue.get_info(did)
        return self._child(parent.ino, info)

    async def _lookup_listed(self, parent: Node, component: str) -> Node:
        if parent.kind in _LISTED_KINDS:
            info = (await self._listing(parent)).by_name.get(component)
            if info is not None:
                return self._child(parent.ino, info)
        else:
            for name, child in zip(*await self.list_dir(parent), strict=True):
                if name == component:
                    return child
        raise NotFoundError(f"{component!r} is not in {parent.label or parent.did}")

    async def _listing(self, node: Node) -> _Listing:
        """A catalogue-backed directory's entries and name index, kept as long as the catalogue
        keeps the listing itself, so that a lookup in a large directory is a dict access."""
        key = (node.kind, node.did, node.scope, node.label)
        listing = self._listings.get(key)
        if listing is not None:
            return listing
        assert node.scope is not None
        if node.kind is NodeKind.SCOPE:
            infos = await self._catalogue.list_collections(node.scope)
        elif node.kind is NodeKind.COLLECTION:
            assert node.did is not None
            dataset = node.info is not None and node.info.type is DIDType.DATASET
            infos = await self._with_times(await self._catalogue.list_content(node.did, dataset))
        else:
            infos = await self._with_times(await self._catalogue.query(node.scope, node.label))
        with gc_paused:  # a name per entry (datalakefs/gcpause.py)
            names = components_for([info.did for info in infos], node.scope)
            listing = _Listing(names, tuple(infos), dict(zip(names, infos, strict=True)))
        self._listings[key] = listing
        return listing

    def _children(self, parent: Node, listing: _Listing) -> list[Node]:
        """The nodes of a listing's entries, built once per listing (an ``ls`` of 100,000 entries
        spent half its time re-interning them): a node the kernel has forgotten since, or that the
        inode table has replaced, is interned again, so no stale inode is handed out."""
        if listing.children_of != parent.ino:
            intern_child = self._child
            with gc_paused:  # a node per entry (datalakefs/gcpause.py)
                listing.children = [intern_child(parent.ino, info) for info in listing.infos]
            listing.children_of = parent.ino
            return list(listing.children)
        children, current = listing.children, self._inodes.current
        for index, child in enumerate(children):
            if not current(child):
                children[index] = self._child(parent.ino, listing.infos[index])
        return list(children)

    def listed(self, directory: Node) -> tuple[DIDInfo, ...] | None:
        """The directory's entries in listing order while its listing is cached; ``None`` otherwise
        (never a catalogue call: for the prefetch, which follows a reader, not a listing)."""
        listing = self._listings.get((directory.kind, directory.did, directory.scope, directory.label))
        return None if listing is None else listing.infos

    def forget_listing(self, did: DID) -> None:
        """Drop the cached listings of collection ``did`` (the daemon changed its content)."""
        for key in [k for k in self._listings if k[1] == did]:
            self._listings.pop(key, None)

    def forget_scope_listing(self, scope: str) -> None:
        """Drop the cached list of ``scope``'s collections (the daemon created a dataset in it)."""
        for key in [k for k in self._listings if k[0] is NodeKind.SCOPE and k[2] == scope]:
            self._listings.pop(key, None)

    async def _query_node(self, parent: Node, component: str) -> Node:
        assert parent.scope is not None
        await self._catalogue.query(parent.scope, component)
        return self._virtual(NodeKind.QUERY_RESULT, parent.ino, component, parent.scope)

    async def _with_times(self, infos: list[DIDInfo]) -> list[DIDInfo]:
        """Listings carry sizes and checksums but no times. Up to ``times_limit`` entries, one bulk
        metadata call fetches them; above that it would cost ~0.25 s per 1,000 entries, so the
        entries stay without times and show their directory's (see ``fs/attributes.py``): the
        catalogue's answer is used as it is, not copied entry by entry."""
        missing = [info.did for info in infos if not info.created_at]
        if not missing or len(missing) > self._times_limit:
            return infos
        timed = {info.did: info for info in await self._catalogue.get_infos(missing)}
        return [_merge(info, timed.get(info.did)) for info in infos]

    def renewed(self, node: Node) -> Node:
        """``node`` if the inode table still has it, else the node it would be interned as now (a
        directory handle's entry the kernel forgot while the handle was open)."""
        if self._inodes.current(node):
            return node
        if node.info is not None:
            return self._child(node.parent, node.info)
        return self._virtual(node.kind, node.parent, node.label, node.scope)

    def _child(self, parent_ino: int, info: DIDInfo) -> Node:
        did = info.did
        kind = NodeKind.FILE if info.type is DIDType.FILE else NodeKind.COLLECTION
        # inodes.py: one inode per file DID (keyed by the DID itself: no tuple per file), one per
        # (parent, DID) for directories
        key: Hashable = did if kind is NodeKind.FILE else ("dir", parent_ino, did)
        return self._inodes.intern(key, kind, parent_ino, did, info, did.scope)

    def _virtual(self, kind: NodeKind, parent: int, label: str, scope: str | None = None) -> Node:
        """A node with no DID of its own: a scope, a control entry, a query directory."""
        return self._inodes.intern((kind, parent, label), kind, parent, scope=scope, label=label)

    def _scope_node(self, scope: str) -> Node:
        return self._virtual(NodeKind.SCOPE, ROOT_INODE, scope, scope)

    def _control_dir(self) -> Node:
        return self._virtual(NodeKind.CONTROL_DIR, ROOT_INODE, CONTROL_DIR)

    def _control_file(self, name: str) -> Node:
        return self._virtual(NodeKind.CONTROL_FILE, self._control_dir().ino, name)

    def _query_root(self) -> Node:
        return self._virtual(NodeKind.QUERY_ROOT, ROOT_INODE, QUERY_DIR)

    def _query_scope(self, scope: str) -> Node:
        return self._virtual(NodeKind.QUERY_SCOPE, self._query_root().ino, scope, scope)

def _merge(listed: DIDInfo, timed: DIDInfo | None) -> DIDInfo:
    if timed is None:
        return listed
    return DIDInfo(
        did=listed.did,
        type=listed.type,
        size=listed.size if listed.size is not None else timed.size,
        adler32=listed.adler32 or timed.adler32,
        md5=listed.md5 or timed.md5,
        created_at=timed.created_at,
        updated_at=timed.updated_at,
    )
