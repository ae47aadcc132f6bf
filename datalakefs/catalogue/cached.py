"""The catalogue as the daemon's trio code sees it: async, cached, shared, counted.

:class:`CachedCatalogue` wraps a blocking :class:`~datalakefs.catalogue.base.Catalogue`. Contracts:

* **Never blocks the trio loop.** Every backend call runs in ``trio.to_thread.run_sync`` under one
  ``CapacityLimiter`` (``catalogue_concurrency``), abandoned on cancellation so that an interrupted
  caller does not wait for a hung server (the thread finishes in the background, still holding its
  limiter token, and its answer is dropped).
* **TTL caching** (cachetools ``TTLCache``): answers live ``catalogue_ttl`` seconds; ``NotFoundError``
  answers live ``negative_ttl`` seconds and are raised again from the cache. Other errors (outage,
  refused credentials) are never cached. Bulk calls (``get_infos``, ``list_replicas``) are cached per
  DID, so a later single lookup is served by an earlier bulk answer and only missing DIDs are fetched.
* **Listings stream** (:meth:`content_stream`, catalogue/stream.py): a collection's content is handed
  out as it arrives, batch by batch, to everyone who asks while it does (one backend call), and cached
  only once the answer has ended well; a stream that breaks off caches nothing.
* **Replicas per listing, not per file.** :meth:`list_content` and :meth:`query` remember which
  files they listed, in order. A replica lookup of such a file that misses the cache resolves a batch
  of the listing's files around it in one ``list_replicas`` call: the listing is cut into batches of
  :data:`FIRST_REPLICA_BATCH` files, doubling up to :data:`REPLICA_BATCH` (the server's limit per
  request), so the first open waits for a small batch and a reader going through the dataset pays one
  call per thousand files. Every file's answer is cached as if asked for alone; concurrent opens in
  one batch share its call. Invalidating the dataset forgets its files' replicas too.
* **Swept ahead of the reader.** While :meth:`run` runs (the daemon starts it), the first open in a
  listing also starts a background sweep of the listing's other batches, from the opened file's on
  (then from the start), at most :data:`SWEEP_CALLS` calls at once over all listings. An open of a
  file whose batch the sweep is fetching joins that call; a batch already cached costs nothing. Only
  an open starts a sweep, not ``ls``: browsing must not make the server resolve whole datasets.
  A lookup that walks a path to a listed file (:meth:`expect_open`, from the namespace, when it has
  just listed the file's directory) asks for that file's first batch at once, in the background,
  beside the listing's times: the open that follows joins it.
  (One call over the dataset DID was measured and rejected: the server's cost is per file, about
  10 ms each on the demo lake, so a 10k dataset made the first read wait 112 s instead of 0.5 s.)
* **Presumed from the first batch** (:meth:`locate`): the listing's other files are presumed to be
  where every file of its first batch is (:meth:`_presume`, docs/ARCHITECTURE.md). While :meth:`run`
  runs, that runs in the background: the opener the batch answered does not wait for it (deriving
  names may cost a call for the RSE's settings); openers of the listing's other files do.
* **Single flight.** Concurrent identical requests share one backend call. When the caller that made
  the call is cancelled before it ends, a waiting caller makes it again instead of failing.
* **Explicit invalidation** (:meth:`invalidate`, :meth:`invalidate_collection`) for changes the
  daemon itself makes. A backend answer that was in flight while an invalidation happened is returned
  to its callers but not cached, so it cannot resurrect what was just invalidated.
* **Clock.** The caches use ``trio.current_time`` (``trio.testing.MockClock`` in tests), so every
  method, :meth:`statistics` and the invalidations included, must be called from the trio thread
  inside ``trio.run``. Only the backend calls leave that thread.
* **Rule calls are not cached** (:meth:`replica_on`, :meth:`file_rules`, :meth:`did_rules`, :meth:`add_rule`,
  :meth:`get_rule`, :meth:`rule_locks`): rule staging polls them to see progress, so each call asks the
  server; they still run on worker threads under the limiter and are counted.
* Answers are handed out as new lists (and dicts): callers may keep or change them freely.
"""

from __future__ import annotations

import logging
import time
import types
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import trio
from cachetools import LRUCache, TTLCache

from datalakefs.background import Background
from datalakefs.catalogue.base import Batches, Catalogue
from datalakefs.catalogue.stream import ContentStream
from datalakefs.config import Config
from datalakefs.errors import CatalogueUnavailableError, DatalakeError, NotFoundError
from datalakefs.model import DID, DIDInfo, DIDType, FileReplicas, Lock, Replica, RSEReplica, Rule

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Entries per cache (positive and negative each): one per DID for facts and replicas, one per listing.
DEFAULT_MAXSIZE: Final = 500_000

#: Files in a listing's first replica batch: what the first open in a dataset waits for.
FIRST_REPLICA_BATCH: Final = 100

#: The largest replica batch: the server's limit of DIDs per request.
REPLICA_BATCH: Final = 1000

#: Background replica calls at once, over every listing being swept: a server's cost is per file, so
#: more would only queue there, and foreground calls must still find a free worker.
SWEEP_CALLS: Final = 2

#: Listings whose last sweep is remembered (so that re-opening them does not sweep them again).
SWEPT_LISTINGS: Final = 10_000


@dataclass(frozen=True, slots=True)
class CatalogueStatistics:
    """A snapshot of the cached catalogue's counters, for ``status.json``.

    ``calls``/``errors`` count backend calls per method (errors exclude ``NotFoundError``);
    ``hits``/``negative_hits``/``misses`` count DIDs or listings asked for; ``shared`` counts
    requests that joined a call already in flight; ``streaming`` listings whose answer is still
    arriving (:meth:`CachedCatalogue.content_stream`); ``sweeping`` listings whose replicas are being
    resolved in the background; ``last_error_at`` is wall-clock POSIX seconds.
    """

    calls: Mapping[str, int]
    errors: Mapping[str, int]
    hits: int
    negative_hits: int
    misses: int
    shared: int
    in_flight: int
    streaming: int
    sweeping: int
    cached_entries: int
    last_error: str | None
    last_error_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "errors": dict(self.errors),
            "hits": self.hits,
            "negative_hits": self.negative_hits,
            "misses": self.misses,
            "shared": self.shared,
            "in_flight": self.in_flight,
            "streaming": self.streaming,
            "sweeping": self.sweeping,
            "cached_entries": self.cached_entries,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


class _Flight:
    """One backend call that identical requests wait for."""

    __slots__ = ("done", "error", "finished", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.finished = False
        self.value: Any = None
        self.error: DatalakeError | None = None


#: Cache methods whose answers are keyed by one DID.
_PER_DID: Final = ("get_info", "get_metadata", "list_replicas", "list_content")


class CachedCatalogue:
    """The async, cached face of a blocking catalogue (see the module docstring)."""

    def __init__(
        self,
        catalogue: Catalogue,
        config: Config,
        *,
        limiter: trio.CapacityLimiter | None = None,
        timer: Callable[[], float] = trio.current_time,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> None:
        self._backend = catalogue
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(config.catalogue_concurrency)
        self._positive: TTLCache[Hashable, Any] = TTLCache(maxsize, config.catalogue_ttl, timer=timer)
        self._negative: TTLCache[Hashable, str] = TTLCache(maxsize, config.negative_ttl, timer=timer)
        self._flights: dict[Hashable, _Flight] = {}
        # listings whose answer is being read (content_stream), and the nursery of their readers
        self._streams: dict[tuple[str, DID], ContentStream] = {}
        self._streaming = Background()
        # Each listed dataset's last listing, and where each file was last listed. They outlive the
        # TTL (the kernel may open a file long after its listing expired) and are replaced when the
        # dataset is listed again: a file added since is looked up alone until then, a file removed
        # since is simply not in the dataset's answer.
        # A listing is a dataset's (keyed by its DID) or a query's (keyed like the query's answer).
        # Both bounded by ``maxsize`` listed files in all (see _Listings).
        self._homes: dict[DID, Hashable] = {}
        self._members = _Listings(maxsize, self._homes)
        self._generation = 0
        self._timer = timer
        self._ttl = config.catalogue_ttl
        self._rse_preference = config.rse_preference
        self._sweeper = Background()
        self._sweep_slots = trio.Semaphore(SWEEP_CALLS)
        # when each listing's first batch was answered, and whether its other files' replicas were
        # presumed from that answer (once per listing and TTL)
        self._placements: LRUCache[Hashable, _Mark] = LRUCache(SWEPT_LISTINGS)
        # listings whose presumption runs in the background: set when it ended
        self._presuming: dict[Hashable, trio.Event] = {}
        # when each listing's sweep started: one sweep per listing and TTL
        self._swept: LRUCache[Hashable, _Mark] = LRUCache(SWEPT_LISTINGS)
        self._calls: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._hits = 0
        self._negative_hits = 0
        self._misses = 0
        self._shared = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read listings' answers and sweep listed datasets' replicas in the background until cancelled
        (the daemon's nursery): without it, a listing is read whole before it is handed out, and
        replicas are still resolved per batch, at the open that needs them."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._streaming.run)
            await nursery.start(self._sweeper.run)
            task_status.started()

    # -- reads -----------------------------------------------------------------------------------

    async def list_scopes(self) -> list[str]:
        return list(await self._single(("list_scopes",), self._backend.list_scopes))

    async def list_collections(self, scope: str) -> list[DIDInfo]:
        return list(await self._single(("list_collections", scope), self._backend.list_collections, scope))

    async def content_stream(self, did: DID, dataset: bool = False) -> ContentStream:
        """The content of collection ``did`` as it arrives (catalogue/stream.py): the cached answer, the
        stream already running for it (single flight), or a new one. ``dataset``: the caller knows it is
        a dataset, whose content is its files: the backend is asked ``list_files``, the same answer for
        less work (the cache keeps it as the collection's content either way, counted as
        ``list_content``).

        While :meth:`run` runs, the answer is read by a task of its own and this returns at once: the
        stream outlives the request that started it, and it is cached (with the TTL, like any answer)
        only once it has ended well. Otherwise the whole answer is read before this returns. Either way
        an error is the stream's (``ContentStream.error``), not raised here, except a "not found"
        remembered from an earlier answer."""
        key = ("list_content", did)
        cached = self._positive.get(key, _ABSENT)
        if cached is not _ABSENT:
            self._hits += 1
            self._remember_members(did, cached)
            return ContentStream.answered(cached)
        missing = self._negative.get(key)
        if missing is not None:
            self._negative_hits += 1
            raise NotFoundError(missing)
        stream = self._streams.get(key)
        if stream is not None:
            self._shared += 1
            return stream
        self._misses += 1
        stream = self._streams[key] = ContentStream()
        fetch = self._backend.list_files if dataset else self._backend.list_content
        if not self._streaming.start_soon(self._read_stream, key, stream, fetch, self._generation):
            await self._read_stream(key, stream, fetch, self._generation)
        return stream

    async def list_content(self, did: DID, dataset: bool = False) -> list[DIDInfo]:
        """The whole content of collection ``did`` (:meth:`content_stream`, waited for to its end)."""
        return list(await (await self.content_stream(did, dataset)).whole())

    async def _read_stream(self, key: tuple[str, DID], stream: ContentStream,
                           fetch: Callable[[DID], Batches], generation: int) -> None:
        """Read one listing's answer into ``stream`` on a worker thread, each batch handed to the trio
        thread as it is parsed; cache it once it ended well. Never raises but trio's cancellation (the
        mount ending), which ends the stream with an error so that no reader waits for ever."""
        did = key[1]
        token = trio.lowlevel.current_trio_token()
        # where each file was listed, made on the worker thread as the batches arrive: the end of the
        # answer, which every reader waits for, then merges it instead of hashing every file's DID
        homes: dict[DID, Hashable] = {}

        def produce() -> None:
            with closing(fetch(did)) as batches:
                for batch in batches:
                    if stream.abandoned:
                        return
                    token.run_sync_soon(stream.extend, batch)
                    homes.update(_homes_of(did, batch))

        try:
            await self._call("list_content", produce)
        except NotFoundError as exc:
            if generation == self._generation:
                self._negative[key] = str(exc)
            stream.fail(exc)
        except Exception as exc:
            received = len(stream.rows)
            if received:
                log.warning("event=listing-broken did=%s entries=%d reason=%s", did, received, exc)
                exc = CatalogueUnavailableError(f"the listing of {did} broke off after {received} entries: {exc}")
            elif not isinstance(exc, DatalakeError):
                log.error("listing %s failed unexpectedly", did, exc_info=exc)
                exc = CatalogueUnavailableError(f"the listing of {did} failed: {exc!r}")
            stream.fail(exc)
        except BaseException:
            stream.fail(CatalogueUnavailableError(f"the listing of {did} was interrupted"))
            raise
        else:
            content = tuple(stream.rows)
            if generation == self._generation:
                self._positive[key] = content
            self._remember_members(did, content, homes)
            stream.finish(content)
        finally:
            if self._streams.get(key) is stream:
                del self._streams[key]

    async def get_info(self, did: DID) -> DIDInfo:
        info: DIDInfo = await self._single(("get_info", did), self._backend.get_info, did)
        return info

    async def get_metadata(self, did: DID) -> dict[str, str]:
        return dict(await self._single(("get_metadata", did), self._backend.get_metadata, did))

    async def query(self, scope: str, filters: str) -> list[DIDInfo]:
        key = ("query", scope, filters)
        found: Any = await self._single(key, self._backend.query, scope, filters)
        self._remember_members(key, found)
        return list(found)

    async def get_infos(self, dids: Sequence[DID]) -> list[DIDInfo]:
        """Facts of many DIDs; cached ones are not asked again, the rest in one backend call.
        Unknown DIDs are left out (and remembered as unknown for ``negative_ttl``)."""
        found: dict[DID, DIDInfo] = await self._bulk("get_info", "get_infos", self._backend.get_infos, dids)
        return [found[did] for did in dict.fromkeys(dids) if did in found]

    async def list_replicas(self, dids: Sequence[DID]) -> list[FileReplicas]:
        """Replicas of files (file DIDs only), cached per file like :meth:`get_infos`; a file of a
        listed dataset brings its dataset's replicas along (see the module docstring)."""
        for did in dict.fromkeys(dids):
            if ("list_replicas", did) not in self._positive:
                await self._resolve_listed_replicas(did)
        found: dict[DID, FileReplicas] = await self._bulk(
            "list_replicas", "list_replicas", self._backend.list_replicas, dids
        )
        return [found[did] for did in dict.fromkeys(dids) if did in found]

    # -- replication rules (never cached: see the module docstring) -----------------------------

    async def replica_on(self, did: DID, rse: str) -> RSEReplica | None:
        return await self._call("replica_on", self._backend.replica_on, did, rse)

    async def file_rules(self, did: DID) -> list[Rule]:
        return list(await self._call("file_rules", self._backend.file_rules, did))

    async def did_rules(self, did: DID) -> list[Rule]:
        return list(await self._call("did_rules", self._backend.did_rules, did))

    async def add_rule(self, did: DID, rse: str, lifetime: int | None, activity: str | None,
                       account: str | None, asynchronous: bool = False) -> tuple[Rule, bool]:
        return await self._call("add_rule", self._backend.add_rule, did, rse, lifetime, activity, account,
                                asynchronous)

    async def get_rule(self, rule_id: str) -> Rule:
        return await self._call("get_rule", self._backend.get_rule, rule_id)

    async def rule_locks(self, rule: Rule) -> list[Lock]:
        return list(await self._call("rule_locks", self._backend.rule_locks, rule))

    # -- invalidation ----------------------------------------------------------------------------

    def invalidate(self, did: DID) -> None:
        """The daemon changed or created ``did``: forget every answer about it (facts, metadata,
        replicas, presumed or not, its listing), "not found" answers included."""
        self._forget([*[(method, did) for method in _PER_DID], ("presumed_replicas", did),
                      *self._forget_members(did)])

    def invalidate_collection(self, did: DID) -> None:
        """The daemon changed the content of collection ``did`` (attached to it, or created it):
        everything :meth:`invalidate` forgets, plus its scope's list of collections and its scope's
        query results (a new DID may match a query)."""
        queries = [key for key in self._positive if _is_query_of(key, did.scope)]
        queries += [key for key in self._negative if _is_query_of(key, did.scope)]
        keys: list[Hashable] = [(method, did) for method in _PER_DID]
        members = [key for listing in [did, *queries] for key in self._forget_members(listing)]
        self._forget([*keys, *members, ("list_collections", did.scope), *queries])

    # -- replicas per dataset ---------------------------------------------------------------------

    def _remember_members(self, listing: Hashable, content: tuple[DIDInfo, ...],
                          homes: dict[DID, Hashable] | None = None) -> None:
        """Record ``content`` as the listing's files, unless it is the cache's tuple recorded already:
        a new tuple is a new listing. Each file's home is set in one dict update, not in a Python
        loop over an LRU cache: that loop was a seventh of the daemon's time for a cold ``ls -l`` of
        100,000 files, and the LRU's own records cost about 200 bytes per file. ``homes``: the
        content's homes made already (:func:`_homes_of`, while the answer arrived), merged without
        hashing the DIDs again (30 ms for 100,000, at the end of an ``ls`` that waits for it)."""
        members = self._members.get(listing)
        if members is not None and members.content is content:
            return
        self._members[listing] = _Members(content)
        self._homes.update(_homes_of(listing, content) if homes is None else homes)

    def _home_of(self, did: DID) -> tuple[Hashable, tuple[DIDInfo, ...], int] | None:
        """The listing that holds file ``did``, its content and ``did``'s position in it; ``None`` when
        it was never listed, or its listing was forgotten or made anew without it."""
        listing = self._homes.get(did)
        if listing is None:
            return None
        members = self._members.get(listing)
        position = None if members is None else members.position(did)
        if members is None or position is None:
            return None
        return listing, members.content, position

    def _current(self, mark: _Mark | None, content: tuple[DIDInfo, ...]) -> bool:
        """Whether ``mark`` was made for this very listing within the TTL."""
        return mark is not None and mark.content is content and self._timer() - mark.at < self._ttl

    async def _resolve_listed_replicas(self, did: DID) -> None:
        """Cache the replicas of the batch of ``did``'s listing that holds it, in one call shared by
        every concurrent opener in that batch, and sweep the rest of the listing in the background."""
        home = self._home_of(did)
        if home is None:
            return  # a per-file lookup follows
        listing, content, position = home
        first, end = replica_batch(position)
        await self._resolve_batch(listing, content, first, end)
        await self._presumption_of(listing)
        placed = self._placements.get(listing)
        if placed is None or not placed.presumed:
            self._start_sweep(listing, content, end)  # nothing presumed: the catalogue must say

    async def _resolve_batch(self, listing: Hashable, content: tuple[DIDInfo, ...], first: int, end: int) -> None:
        """One ``list_replicas`` call for the files of ``content[first:end]`` not cached yet (none when
        all are), shared by whoever asks for the same batch meanwhile: an opener and the sweep."""
        batch = [info for info in content[first:end]
                 if info.type is DIDType.FILE and ("list_replicas", info.did) not in self._positive]
        if not batch:
            return
        asked = [info.did for info in batch]

        async def fetch(generation: int) -> None:
            answers = await self._call("list_replicas", self._backend.list_replicas, asked)
            if generation != self._generation:
                return
            # a listed file the answer leaves out has no replica: cached as such, not asked again alone
            replicas = {answer.info.did: answer for answer in answers}
            known = [replicas.get(info.did) or FileReplicas(info, ()) for info in batch]
            for found in known:
                self._positive[("list_replicas", found.info.did)] = found
            if not self._current(self._placements.get(listing), content):
                self._placements[listing] = _Mark(content, self._timer())
                if not self._presume_in_background(listing, content, known, generation):
                    presumed = await self._presume(content, known, generation)
                    self._placements[listing] = _Mark(content, self._timer(), presumed)

        await self._shared_flight(("listed_replicas", listing, first), fetch)

    def _presume_in_background(self, listing: Hashable, content: tuple[DIDInfo, ...], known: list[FileReplicas],
                               generation: int) -> bool:
        """Run :meth:`_presume` in the background (while :meth:`run` runs; False otherwise): the opener that
        asked for the first batch has its answer, and must not wait for the RSE's settings that deriving
        names may cost (a second round trip on a fresh mount). Openers of the listing's other files wait
        for it (:meth:`_presumption_of`); a presumption that fails leaves them to ask the catalogue."""
        if not self._sweeper.running:
            return False
        done = self._presuming[listing] = trio.Event()

        async def presume() -> None:
            presumed = False
            try:
                presumed = await self._presume(content, known, generation)
            except Exception as exc:  # the background must not take the mount down
                log.warning("event=replica-presumption-failed listing=%s reason=%s", listing, exc)
            finally:
                self._placements[listing] = _Mark(content, self._timer(), presumed)
                if self._presuming.get(listing) is done:
                    del self._presuming[listing]
                done.set()

        self._sweeper.start_soon(presume)
        return True

    async def _presumption_of(self, listing: Hashable) -> None:
        """Until the listing's presumption running in the background, if any, has ended."""
        done = self._presuming.get(listing)
        if done is not None:
            await done.wait()

    async def _presume(self, content: tuple[DIDInfo, ...], known: list[FileReplicas], generation: int) -> bool:
        """Presume the listing's other files are where every file of ``known`` (the catalogue's answer
        for one batch) is, under their deterministic names, and cache that as their presumed replicas.

        Only an RSE holding every file of the batch counts, and only when the names derived for the batch
        are the very names the catalogue gave: a dataset split over RSEs, or an RSE whose names cannot be
        derived, is asked about file by file as before. Of those, the first in ``rse_preference`` and
        the catalogue's order is the one presumed: deriving costs a catalogue call per RSE (its
        settings), and a reader that does not find a file where it was presumed asks the catalogue
        (:meth:`list_replicas`), which names every replica."""
        if not known or not all(found.replicas for found in known):
            return False
        first, *rest = known
        common = [replica.rse for replica in first.by_preference(self._rse_preference)
                  if all(any(other.rse == replica.rse for other in found.replicas) for found in rest)]
        # the batch's own files are derived too: their names are the proof
        files = [info for info in content if info.type is DIDType.FILE]
        if len(files) <= len(known):
            return False  # the catalogue answered for every file already
        for rse in dict.fromkeys(common):
            names = await self._call("derive_pfns", self._backend.derive_pfns, rse, [info.did for info in files])
            given = [{replica.pfn for replica in found.replicas if replica.rse == rse} for found in known]
            if names and all(names.get(found.info.did) in pfns for found, pfns in zip(known, given, strict=True)):
                break
        else:
            return False
        if generation != self._generation:
            return False
        for info in files:
            replicas = (Replica(rse, names[info.did]),) if info.did in names else ()
            self._positive[("presumed_replicas", info.did)] = FileReplicas(info, replicas, presumed=True)
        return True

    async def locate(self, did: DID) -> FileReplicas | None:
        """Where to read file ``did`` from: the catalogue's cached answer, else the replicas presumed
        from its dataset (:meth:`_presume`), else the catalogue's answer (:meth:`list_replicas`);
        ``None`` for a DID the catalogue does not know."""
        for attempt in range(2):
            for key in (("list_replicas", did), ("presumed_replicas", did)):
                found = self._positive.get(key)
                if found is not None:
                    self._hits += 1
                    return found  # type: ignore[no-any-return]
            if attempt == 0 and not await self._place_listing_of(did):
                break
        answers = await self.list_replicas([did])
        return answers[0] if answers else None

    async def _place_listing_of(self, did: DID) -> bool:
        """Before the first answer for ``did``'s listing: ask for the :data:`FIRST_REPLICA_BATCH` files
        from ``did`` on, once for every concurrent opener of the listing, so that the placement
        presumed from it serves them all (16 workers starting at 16 places of a dataset would
        otherwise each wait for a large batch of their own), and for the presumption made from that
        answer unless it answered for ``did`` itself. True when something was asked or waited for."""
        home = self._home_of(did)
        if home is None:
            return False
        listing, content, position = home
        if not self._current(self._placements.get(listing), content):

            async def decide(generation: int) -> None:
                await self._resolve_batch(listing, content, position, position + FIRST_REPLICA_BATCH)

            await self._shared_flight(("placement", listing), decide)
        elif listing not in self._presuming:
            return False
        if ("list_replicas", did) not in self._positive:
            await self._presumption_of(listing)
        return True

    def expect_open(self, did: DID) -> None:
        """A path is being walked to file ``did`` of a listing that has just been answered (a lookup,
        which an open usually follows): ask for the replicas of its first batch in the background
        now (:meth:`_place_listing_of`, shared with the open that joins it), not at the open, which
        waits for the listing's times first. Nothing for a DID no listing holds, a listing already
        placed within the TTL, or while :meth:`run` is not running. Browsing (``ls``, ``find``) does
        not look files up by name: the kernel has them from READDIRPLUS."""
        if self._sweeper.running and self._home_of(did) is not None:
            self._sweeper.start_soon(self._expected_open, did)

    async def _expected_open(self, did: DID) -> None:
        try:
            await self._place_listing_of(did)
        except Exception as exc:  # the background must not take the mount down; the open asks itself
            log.warning("event=replica-placement-failed did=%s reason=%s", did, exc)

    def _start_sweep(self, listing: Hashable, content: tuple[DIDInfo, ...], after: int) -> None:
        """Resolve the listing's other batches in the background, from ``after`` on and then from its
        start, so that a reader going through the listing finds its next files' replicas cached or in
        flight instead of waiting for a call per batch. Once per listing and TTL; only while
        :meth:`run` runs (the daemon's nursery)."""
        if not self._sweeper.running or len(content) <= after:
            return
        if self._current(self._swept.get(listing), content):
            return
        self._swept[listing] = _Mark(content, self._timer())
        self._sweeper.start_soon(self._sweep, listing, content, after, self._generation)

    async def _sweep(self, listing: Hashable, content: tuple[DIDInfo, ...], after: int, generation: int) -> None:
        batches, first = [], 0
        while first < len(content):
            batches.append((first, replica_batch(first)[1]))
            first = batches[-1][1]
        ordered = [b for b in batches if b[0] >= after] + [b for b in batches if b[0] < after]
        async with trio.open_nursery() as calls:
            for first, end in ordered:
                await self._sweep_slots.acquire()  # in order: the batches nearest the reader go first
                members = self._members.get(listing)
                if generation != self._generation or members is None or members.content is not content:
                    self._sweep_slots.release()
                    return  # invalidated or listed anew: the next open starts from the new listing
                calls.start_soon(self._sweep_batch, listing, content, first, end)

    async def _sweep_batch(self, listing: Hashable, content: tuple[DIDInfo, ...], first: int, end: int) -> None:
        try:
            await self._resolve_batch(listing, content, first, end)
        except Exception as exc:  # the background must not take the mount down
            # an opener of these files asks again (and gets the error) itself
            log.warning("event=replica-sweep-failed listing=%s first=%d reason=%s", listing, first, exc)
        finally:
            self._sweep_slots.release()

    def _forget_members(self, listing: Hashable) -> list[Hashable]:
        """The cache keys of a listing's files' replicas, its record dropped."""
        members = self._members.pop(listing, None)
        if members is None:
            return []
        content = members.content
        _leave_homes(self._homes, listing, content)
        return [(method, info.did) for info in content for method in ("list_replicas", "presumed_replicas")]

    # -- status ----------------------------------------------------------------------------------

    def statistics(self) -> CatalogueStatistics:
        return CatalogueStatistics(
            calls=types.MappingProxyType(dict(self._calls)),
            errors=types.MappingProxyType(dict(self._errors)),
            hits=self._hits,
            negative_hits=self._negative_hits,
            misses=self._misses,
            shared=self._shared,
            in_flight=len(self._flights),
            streaming=len(self._streams),
            sweeping=self._sweeper.tasks,
            cached_entries=len(self._positive) + len(self._negative),
            last_error=self._last_error,
            last_error_at=self._last_error_at,
        )

    # -- internals -------------------------------------------------------------------------------

    async def _single(self, key: tuple[Hashable, ...], fn: Callable[..., T], *args: Any) -> T:
        """One cached answer: from the cache, from a call in flight, or from a new backend call."""
        cached = self._positive.get(key, _ABSENT)
        if cached is not _ABSENT:
            self._hits += 1
            return cached  # type: ignore[no-any-return]
        missing = self._negative.get(key)
        if missing is not None:
            self._negative_hits += 1
            raise NotFoundError(missing)
        self._misses += 1

        async def fetch(generation: int) -> Any:
            try:
                value = _freeze(await self._call(str(key[0]), fn, *args))
            except NotFoundError as exc:
                if generation == self._generation:
                    self._negative[key] = str(exc)
                raise
            if generation == self._generation:
                self._positive[key] = value
            return value

        return await self._shared_flight(key, fetch)

    async def _bulk(
        self,
        cache_method: str,
        backend_method: str,
        fn: Callable[[Sequence[DID]], Sequence[Any]],
        dids: Sequence[DID],
    ) -> dict[DID, Any]:
        """Per-DID cached answers of a bulk call; results are matched to DIDs by their ``.did`` or
        ``.info.did``; DIDs the backend leaves out become "not found" entries."""
        found: dict[DID, Any] = {}
        missing: list[DID] = []
        for did in dict.fromkeys(dids):
            cached = self._positive.get((cache_method, did), _ABSENT)
            if cached is not _ABSENT:
                self._hits += 1
                found[did] = cached
            elif (cache_method, did) in self._negative:
                self._negative_hits += 1
            else:
                self._misses += 1
                missing.append(did)
        if not missing:
            return found

        async def fetch(generation: int) -> dict[DID, Any]:
            answers = {_did_of(item): item for item in await self._call(backend_method, fn, missing)}
            if generation == self._generation:
                for did in missing:
                    if did in answers:
                        self._positive[(cache_method, did)] = answers[did]
                    else:
                        self._negative[(cache_method, did)] = f"no DID {did} in the catalogue"
            return answers

        answers = await self._shared_flight((backend_method, tuple(missing)), fetch)
        found.update((did, answers[did]) for did in missing if did in answers)
        return found

    async def _shared_flight(self, key: Hashable, fetch: Callable[[int], Awaitable[T]]) -> T:
        while (flight := self._flights.get(key)) is not None:
            self._shared += 1
            await flight.done.wait()
            if flight.finished:
                if flight.error is not None:
                    raise flight.error.anew() from flight.error
                return flight.value  # type: ignore[no-any-return]
            # the caller that was fetching was cancelled: loop, and fetch ourselves if nobody else is
        flight = _Flight()
        self._flights[key] = flight
        try:
            flight.value = await fetch(self._generation)
            flight.finished = True
            return flight.value  # type: ignore[no-any-return]
        except DatalakeError as exc:
            flight.error, flight.finished = exc, True
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    async def _call(self, method: str, fn: Callable[..., T], *args: Any) -> T:
        """One backend call on a worker thread, counted."""
        self._calls[method] += 1
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)
        except NotFoundError:
            raise
        except Exception as exc:
            self._errors[method] += 1
            self._last_error = f"{method}: {exc}"
            self._last_error_at = time.time()
            raise

    def _forget(self, keys: Sequence[Hashable]) -> None:
        """Drop ``keys``, and detach every call in flight: their answers are then not cached, and
        new requests do not join them (see module docstring)."""
        self._generation += 1
        self._flights.clear()
        self._streams.clear()
        for key in keys:
            self._negative.pop(key, None)
            self._positive.pop(key, None)


_ABSENT: Final = object()


@dataclass(slots=True)
class _Members:
    """A listing's content, and each DID's position in it (built at the first open in the listing,
    not at the listing: ``ls`` of a dataset never opens a file)."""

    content: tuple[DIDInfo, ...]
    positions: dict[DID, int] | None = None

    def position(self, did: DID) -> int | None:
        if self.positions is None:
            self.positions = dict(zip([info.did for info in self.content], range(len(self.content)), strict=True))
        return self.positions.get(did)


class _Listings(LRUCache[Hashable, _Members]):
    """The listings remembered, the least recently used dropped first when their files together exceed
    ``maxsize``; a listing dropped takes its files' homes along (``homes``: DID -> listing)."""

    def __init__(self, maxsize: int, homes: dict[DID, Hashable]) -> None:
        super().__init__(maxsize, getsizeof=lambda members: min(max(len(members.content), 1), maxsize))
        self._homes = homes

    def popitem(self) -> tuple[Hashable, _Members]:
        listing, members = super().popitem()
        _leave_homes(self._homes, listing, members.content)
        return listing, members


def _homes_of(listing: Hashable, rows: Sequence[DIDInfo]) -> dict[DID, Hashable]:
    """Each file of ``rows`` mapped to ``listing``."""
    return dict.fromkeys([info.did for info in rows if info.type is DIDType.FILE], listing)


def _leave_homes(homes: dict[DID, Hashable], listing: Hashable, content: tuple[DIDInfo, ...]) -> None:
    """Drop the homes of ``content``'s files that are still ``listing`` (a file listed again since by
    another listing lives there now)."""
    for info in content:
        if homes.get(info.did) == listing:
            del homes[info.did]


@dataclass(frozen=True)
class _Mark:
    """What was done for one listing (this very content) and when."""

    content: tuple[DIDInfo, ...]
    at: float
    presumed: bool = False


def replica_batch(position: int) -> tuple[int, int]:
    """The batch of a listing (start, end) that holds ``position``: the listing is cut into batches
    of :data:`FIRST_REPLICA_BATCH` files, each twice the one before, up to :data:`REPLICA_BATCH`."""
    start, size = 0, FIRST_REPLICA_BATCH
    while start + size <= position:
        start, size = start + size, min(size * 2, REPLICA_BATCH)
    return start, start + size


def _is_query_of(key: Hashable, scope: str) -> bool:
    return isinstance(key, tuple) and len(key) == 3 and key[0] == "query" and key[1] == scope


def _did_of(item: DIDInfo | FileReplicas) -> DID:
    return item.info.did if isinstance(item, FileReplicas) else item.did


def _freeze(value: Any) -> Any:
    """Store lists as tuples and dicts as read-only mappings, so no caller can change the cache."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return types.MappingProxyType(dict(value))
    return value
