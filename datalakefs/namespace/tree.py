"""The directory tree over the catalogue: lookups and listings in terms of nodes.

Layout (SPEC §2)::

    /                      scopes (optionally filtered), plus .datalakefs/ and .query/
    /<scope>/              the scope's collections; any DID of the scope resolves by name
    /<scope>/<collection>/ its content; children of another scope appear as ``scope:name``
    /.query/<scope>/<filter>/  DIDs matching a metadata filter or a name wildcard
    /.datalakefs/          control files (their content is the filesystem layer's business)

Every catalogue call goes through the cached catalogue. The tree keeps one more thing: a per-directory
listing with its name index and its entries' nodes (a node the kernel forgot is renewed by readdir,
never handed out dead), for ``listing_ttl`` — the same TTL as the catalogue's, counted from the end of
the catalogue's answer — so a lookup in a large directory is a dict access. A collection's listing is
handed out while that answer still arrives (catalogue/stream.py): it grows as readers and lookups ask
for more (:class:`ListedEntries`), and one that breaks off is dropped, never kept as if whole.
Nothing here counts kernel references: the filesystem layer does, when it hands nodes to the kernel.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import trio
from cachetools import TTLCache

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.catalogue.stream import ContentStream
from datalakefs.errors import DatalakeError, InvalidNameError, NotFoundError
from datalakefs.gcpause import gc_paused
from datalakefs.model import DID, DIDInfo, DIDType
from datalakefs.namespace.escaping import component_for_scope, components_for, did_for, is_shortened, scope_for
from datalakefs.namespace.inodes import ROOT_INODE, InodeTable, Node, NodeKind

CONTROL_DIR = ".datalakefs"
#: the control file with the mount's options (the daemon renders it; the command line reads it)
CONFIG_FILE = "config.json"
QUERY_DIR = ".query"

_LISTED_KINDS = frozenset({NodeKind.SCOPE, NodeKind.COLLECTION, NodeKind.QUERY_RESULT})


class Entries(Protocol):
    """A directory's entries in order, as parallel sequences (a pair per entry cost 64 bytes each: 6 MB
    for 100,000), which may still be growing while the catalogue's answer arrives: :meth:`ready`
    says how many there are to hand out, waiting when there are none beyond ``start`` yet. An entry's
    position never changes. ``names`` may be shared with a cached listing: never change it."""

    @property
    def names(self) -> Sequence[str]: ...

    @property
    def nodes(self) -> list[Node]:
        """The entries' nodes; a reader may replace one the kernel forgot (``Namespace.renewed``)."""
        ...

    async def ready(self, start: int) -> int:
        """How many entries there are now, once there is one at ``start`` or the directory is whole;
        the listing's error when it broke off before ``start``."""
        ...


class DirEntries(NamedTuple):
    """The entries of a directory known whole at once (``nodes`` is the caller's own)."""

    names: Sequence[str]
    nodes: list[Node]

    async def ready(self, start: int) -> int:
        return len(self.nodes)


@dataclass(slots=True)
class _Listing:
    """Names and infos in listing order, as parallel sequences (a 100,000-entry listing kept as pairs
    held a tuple per entry), growing while ``source``, the catalogue's answer, still arrives."""

    key: tuple[object, ...]
    scope: str
    names: list[str]
    infos: Sequence[DIDInfo]
    by_name: dict[str, DIDInfo]
    #: the catalogue's answer while it arrives; None once the listing is whole (or broke off)
    source: ContentStream | None = None
    #: why the listing broke off (then it is no longer cached: the next opendir lists anew)
    error: DatalakeError | None = None
    #: the entries' nodes (parallel to ``names``, as far as built) under parent inode ``children_of``
    children: list[Node] = field(default_factory=list)
    children_of: int = 0
    #: entries made ready while the answer arrived, counted in ``entries_while_streaming``
    streamed: int = 0


@dataclass(slots=True)
class _Start:
    """A listing being started (its first entries awaited), which concurrent opendirs wait for."""

    done: trio.Event = field(default_factory=trio.Event)
    error: DatalakeError | None = None


class ListedEntries:
    """The entries of a catalogue-backed directory for one open handle: its listing's names, and the
    nodes of as many as are ready, built as the catalogue's answer arrives and shared by every handle
    of the directory under the same parent (a warm ``ls -l`` builds none)."""

    __slots__ = ("_listing", "_namespace", "_parent", "names", "nodes")

    def __init__(self, namespace: Namespace, listing: _Listing, parent: int) -> None:
        self._namespace = namespace
        self._listing = listing
        self._parent = parent
        self.names: Sequence[str] = listing.names
        if listing.children_of != parent:
            listing.children, listing.children_of = [], parent
        self.nodes: list[Node] = listing.children

    async def ready(self, start: int) -> int:
        namespace, listing = self._namespace, self._listing
        await namespace._grown(listing, start)
        ready = len(listing.names)
        if listing.source is not None:  # each entry counted once, whoever asks (readdir, or building ahead)
            namespace.entries_while_streaming += max(ready - max(start, listing.streamed), 0)
            listing.streamed = max(listing.streamed, ready)
        nodes = self.nodes
        if len(nodes) < ready:
            intern_child, parent, infos = namespace._child, self._parent, listing.infos
            with gc_paused:  # a node per entry (datalakefs/gcpause.py)
                nodes += [intern_child(parent, infos[index]) for index in range(len(nodes), ready)]
        return ready


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
        # listings being started (their first batch awaited), so that concurrent opendirs share one
        self._starting: dict[tuple[object, ...], _Start] = {}
        #: entries made ready for readdir while their listing was still arriving (status.json)
        self.entries_while_streaming = 0

    @property
    def inodes(self) -> InodeTable:
        return self._inodes

    def statistics(self) -> dict[str, int]:
        return {"entries_while_streaming": self.entries_while_streaming}

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

    async def list_dir(self, node: Node) -> Entries:
        """The entries of a directory node, in a stable order (no ``.``/``..``)."""
        kind = node.kind
        if kind is NodeKind.ROOT:
            scopes = await self._visible_scopes()
            return DirEntries([CONTROL_DIR, QUERY_DIR, *map(component_for_scope, scopes)],
                              [self._control_dir(), self._query_root(), *map(self._scope_node, scopes)])
        if kind in _LISTED_KINDS:
            return ListedEntries(self, await self._listing(node), node.ino)
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
            listing = await self._listing(parent, component)
            while (info := listing.by_name.get(component)) is None and listing.source is not None:
                await self._grown(listing, len(listing.names))  # not seen yet: it may still arrive
            if info is not None:
                return self._child(parent.ino, info)
            if listing.error is not None:
                raise listing.error.anew() from listing.error
        else:
            entries = await self.list_dir(parent)
            for name, child in zip(entries.names, entries.nodes, strict=True):
                if name == component:
                    return child
        raise NotFoundError(f"{component!r} is not in {parent.label or parent.did}")

    async def _listing(self, node: Node, looked_up: str | None = None) -> _Listing:
        """A catalogue-backed directory's entries and name index, kept as long as the catalogue
        keeps the listing itself, so that a lookup in a large directory is a dict access. A listing
        still arriving is handed out once it holds more than ``times_limit`` entries (it grows as its
        readers wait for more); one that broke off is listed anew. ``looked_up``: the name a lookup
        waits for (:meth:`_new_listing`)."""
        key = (node.kind, node.did, node.scope, node.label)
        while True:
            listing = self._listings.get(key)
            if listing is not None and listing.error is None:
                self._advance(listing)
                if listing.error is None:
                    return listing
            starting = self._starting.get(key)
            if starting is None:
                break
            await starting.done.wait()  # a concurrent opendir is starting it: share its listing
            if starting.error is not None:  # or its error (not one catalogue timeout per waiter)
                raise starting.error.anew() from starting.error
        starting = self._starting[key] = _Start()
        try:
            listing = await self._new_listing(node, key, looked_up)
            self._listings[key] = listing
            return listing
        except DatalakeError as exc:
            starting.error = exc
            raise
        finally:
            del self._starting[key]
            starting.done.set()

    async def _new_listing(self, node: Node, key: tuple[object, ...], looked_up: str | None) -> _Listing:
        """A collection small enough for its entries' times gets them in one more call after its
        content; a lookup of a file in it (a path walked to an open) has that file's replicas asked
        for meanwhile (``CachedCatalogue.expect_open``), instead of after."""
        assert node.scope is not None
        if node.kind is NodeKind.SCOPE:
            return self._whole(key, node.scope, await self._catalogue.list_collections(node.scope))
        if node.kind is not NodeKind.COLLECTION:
            return self._whole(key, node.scope, await self._with_times(await self._catalogue.query(node.scope,
                                                                                                  node.label)))
        assert node.did is not None
        dataset = node.info is not None and node.info.type is DIDType.DATASET
        stream = await self._catalogue.content_stream(node.did, dataset)
        await stream.grown(self._times_limit)
        if stream.content is not None:  # the whole answer, small enough for times, or cached
            if looked_up is not None and not is_shortened(looked_up):
                with contextlib.suppress(DatalakeError):  # a name no DID has: the lookup says so
                    self._catalogue.expect_open(did_for(looked_up, node.scope))
            return self._whole(key, node.scope, await self._with_times(stream.content))
        if stream.error is not None:
            raise stream.error.anew() from stream.error
        listing = _Listing(key, node.scope, [], stream.rows, {}, source=stream)
        self._advance(listing)
        return listing

    def _whole(self, key: tuple[object, ...], scope: str, infos: Sequence[DIDInfo]) -> _Listing:
        infos = infos if isinstance(infos, tuple) else tuple(infos)
        with gc_paused:  # a name per entry (datalakefs/gcpause.py)
            names = components_for([info.did for info in infos], scope)
            return _Listing(key, scope, names, infos, dict(zip(names, infos, strict=True)))

    def _advance(self, listing: _Listing) -> None:
        """Take in what arrived of a streaming listing: names for its new rows; once its answer ended,
        the whole answer (cached afresh, so its TTL runs from its end, as a listing read whole) or why
        it broke off (no longer cached)."""
        source = listing.source
        if source is None:
            return
        rows = listing.infos = source.rows
        known = len(listing.names)
        if known < len(rows):
            arrived = rows[known:]
            with gc_paused:  # a name per entry (datalakefs/gcpause.py)
                names = components_for([info.did for info in arrived], listing.scope)
                listing.names += names
                listing.by_name.update(zip(names, arrived, strict=True))
        if not source.ended:
            return
        listing.source = None
        cached = self._listings.get(listing.key) is listing
        if source.error is not None:
            listing.error = source.error
            if cached:
                del self._listings[listing.key]
        elif cached:
            self._listings[listing.key] = listing

    async def _grown(self, listing: _Listing, count: int) -> None:
        """Return once ``listing`` holds more than ``count`` entries or is whole; its error when it
        broke off before that."""
        self._advance(listing)
        while len(listing.names) <= count and listing.source is not None:
            await listing.source.grown(len(listing.names))
            self._advance(listing)
        if len(listing.names) <= count and listing.error is not None:
            raise listing.error.anew() from listing.error

    def listed(self, directory: Node) -> tuple[DIDInfo, ...] | None:
        """The directory's entries in listing order while its listing is cached; ``None`` otherwise
        (never a catalogue call: for the prefetch, which follows a reader, not a listing)."""
        listing = self._listings.get((directory.kind, directory.did, directory.scope, directory.label))
        if listing is None:
            return None
        self._advance(listing)  # it may have ended since a reader last asked
        if listing.source is not None or listing.error is not None:
            return None  # still arriving (or broke off): the prefetch follows whole listings only
        assert isinstance(listing.infos, tuple)  # a whole listing's rows are a tuple (_whole, _advance)
        return listing.infos

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

    async def _with_times(self, infos: Sequence[DIDInfo]) -> Sequence[DIDInfo]:
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
