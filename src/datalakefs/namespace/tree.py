"""The directory tree over the catalogue: lookups and listings in terms of nodes.

Layout (SPEC §2)::

    /                      scopes (optionally filtered), plus .datalakefs/ and .query/
    /<scope>/              the scope's collections; any DID of the scope resolves by name
    /<scope>/<collection>/ its content; children of another scope appear as ``scope:name``
    /.query/<scope>/<filter>/  DIDs matching a metadata filter or a name wildcard
    /.datalakefs/          control files (their content is the filesystem layer's business)

Every catalogue call goes through the cached catalogue, so the tree itself holds no TTL state except
a per-directory name index, which lives exactly as long as the catalogue's cached listing does.
Nothing here counts kernel references: the filesystem layer does, when it hands nodes to the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.errors import InvalidNameError, NotFoundError
from datalakefs.model import DID, DIDInfo, DIDType
from datalakefs.namespace.escaping import component_for, component_for_scope, did_for, is_shortened, scope_for
from datalakefs.namespace.inodes import ROOT_INODE, InodeTable, Node, NodeKind

CONTROL_DIR = ".datalakefs"
QUERY_DIR = ".query"


class Namespace:
    """Resolves names to nodes and lists directories, creating nodes in the inode table."""

    def __init__(
        self,
        catalogue: CachedCatalogue,
        inodes: InodeTable,
        scopes: Sequence[str] = (),
        control_files: Sequence[str] = (),
    ) -> None:
        self._catalogue = catalogue
        self._inodes = inodes
        self._scope_filter = frozenset(scopes)
        self._control_files = tuple(control_files)

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

    async def list_dir(self, node: Node) -> list[tuple[str, Node]]:
        """The entries of a directory node, in a stable order (no ``.``/``..``)."""
        kind = node.kind
        if kind is NodeKind.ROOT:
            scopes = await self._visible_scopes()
            fixed = [(CONTROL_DIR, self._control_dir()), (QUERY_DIR, self._query_root())]
            return fixed + [(component_for_scope(scope), self._scope_node(scope)) for scope in scopes]
        if kind is NodeKind.SCOPE:
            assert node.scope is not None
            infos = await self._catalogue.list_collections(node.scope)
            return self._entries(node, infos)
        if kind is NodeKind.COLLECTION:
            assert node.did is not None
            infos = await self._with_times(await self._catalogue.list_content(node.did))
            return self._entries(node, infos)
        if kind is NodeKind.QUERY_ROOT:
            return [(component_for_scope(s), self._query_scope(s)) for s in await self._visible_scopes()]
        if kind is NodeKind.QUERY_SCOPE:
            return []
        if kind is NodeKind.QUERY_RESULT:
            assert node.scope is not None
            infos = await self._with_times(await self._catalogue.query(node.scope, node.label))
            return self._entries(node, infos)
        if kind is NodeKind.CONTROL_DIR:
            return [(name, self._control_file(name)) for name in self._control_files]
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
        return self._child(parent, info)

    async def _lookup_listed(self, parent: Node, component: str) -> Node:
        for name, child in await self.list_dir(parent):
            if name == component:
                return child
        raise NotFoundError(f"{component!r} is not in {parent.label or parent.did}")

    async def _query_node(self, parent: Node, component: str) -> Node:
        assert parent.scope is not None
        await self._catalogue.query(parent.scope, component)
        return self._inodes.intern(
            ("query", parent.scope, component),
            lambda ino: Node(ino, NodeKind.QUERY_RESULT, parent.ino, scope=parent.scope, label=component),
        )

    async def _with_times(self, infos: list[DIDInfo]) -> list[DIDInfo]:
        """Listings carry sizes and checksums but no times: fetch those in bulk, once per listing."""
        missing = [info.did for info in infos if not info.created_at]
        if not missing:
            return infos
        timed = {info.did: info for info in await self._catalogue.get_infos(missing)}
        return [_merge(info, timed.get(info.did)) for info in infos]

    def _entries(self, parent: Node, infos: Sequence[DIDInfo]) -> list[tuple[str, Node]]:
        scope = parent.scope or (parent.did.scope if parent.did else "")
        return [(component_for(info.did, scope), self._child(parent, info)) for info in infos]

    def _child(self, parent: Node, info: DIDInfo) -> Node:
        did = info.did
        if info.type is DIDType.FILE:
            return self._inodes.intern(
                ("file", did),
                lambda ino: Node(ino, NodeKind.FILE, parent.ino, did=did, info=info, scope=did.scope),
            )
        return self._inodes.intern(
            ("dir", parent.ino, did),
            lambda ino: Node(ino, NodeKind.COLLECTION, parent.ino, did=did, info=info, scope=did.scope),
        )

    def _scope_node(self, scope: str) -> Node:
        return self._inodes.intern(
            ("scope", scope), lambda ino: Node(ino, NodeKind.SCOPE, ROOT_INODE, scope=scope, label=scope)
        )

    def _control_dir(self) -> Node:
        return self._inodes.intern(
            ("control",), lambda ino: Node(ino, NodeKind.CONTROL_DIR, ROOT_INODE, label=CONTROL_DIR)
        )

    def _control_file(self, name: str) -> Node:
        parent = self._control_dir().ino
        return self._inodes.intern(
            ("control", name), lambda ino: Node(ino, NodeKind.CONTROL_FILE, parent, label=name)
        )

    def _query_root(self) -> Node:
        return self._inodes.intern(
            ("query",), lambda ino: Node(ino, NodeKind.QUERY_ROOT, ROOT_INODE, label=QUERY_DIR)
        )

    def _query_scope(self, scope: str) -> Node:
        parent = self._query_root().ino
        return self._inodes.intern(
            ("query", scope), lambda ino: Node(ino, NodeKind.QUERY_SCOPE, parent, scope=scope, label=scope)
        )


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
