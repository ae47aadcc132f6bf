"""Listing-order prefetch: a reader going through a directory's files finds the next ones cached.

A notebook loop or ``cat *`` opens a dataset's files one after the other in listing order, and each
cold file costs a full round trip to the storage before its first byte. When the opens of one
directory follow its listing (each the next file, or one or two further on), the next files are
fetched whole into the block cache in the background, several at once:

* **bounded**: at most ``listing_prefetch_files`` files ahead of the reader and
  ``listing_prefetch_bytes`` in flight and ahead; a file bigger than that budget is never prefetched
  (the reader's own read-ahead streams it);
* **dropped when the pattern breaks**: an open elsewhere in the directory cancels the fetches in
  flight for it, so a random reader never pays for files it will not read; a directory not read for
  a while is forgotten (only the last :data:`DIRECTORIES` directories are followed);
* **never in the way**: fetches run in the daemon's nursery (:meth:`ListingPrefetch.run`); a failed
  fetch is only counted (the reader's own open meets the error itself), and a fetch joins or is
  joined by the reader's reads of the same blocks (the content service's single flight).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from datalakefs.background import Background
from datalakefs.fs.ports import Warm
from datalakefs.model import DID, DIDInfo, DIDType

log = logging.getLogger(__name__)

#: Directories whose reading pattern is followed at once.
DIRECTORIES: Final = 64

#: How far past the last open the next one may land and still count as going through the listing
#: (``ls`` order vs a glob's, a file skipped by the reader's own filter).
STRIDE: Final = 3

#: Where a reader is before its first open: no first open continues it.
NOWHERE: Final = -(STRIDE + 1)

#: Opens in listing order (after the first) before the prefetch starts: one open is no pattern.
STREAK: Final = 1


@dataclass
class _Directory:
    """What one directory's reader did last, and the fetches running ahead of it."""

    listed: tuple[DIDInfo, ...] = ()
    positions: dict[DID, int] = field(default_factory=dict)  # built once per listing
    last: int = NOWHERE
    streak: int = 0
    ahead: int = -1  # the last index handed to a fetch
    in_flight: dict[int, trio.CancelScope] = field(default_factory=dict)  # index -> its fetch's scope

    def bytes_in_flight(self) -> int:
        return sum(self.listed[index].size or 0 for index in self.in_flight)


class ListingPrefetch:
    """Follows the opens of each directory and warms the files a listing-order reader opens next."""

    def __init__(self, content: Warm, max_files: int, max_bytes: int) -> None:
        self._content = content
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._directories: OrderedDict[int, _Directory] = OrderedDict()
        self._background = Background()
        self.counters: Counter[str] = Counter()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the fetches until cancelled (the daemon's nursery); without it nothing is prefetched."""
        await self._background.run(task_status=task_status)

    def opened(self, directory: int, info: DIDInfo, listed: tuple[DIDInfo, ...]) -> None:
        """File ``info`` of ``directory`` (an inode) was opened for reading; ``listed`` is the
        directory's listing, in order."""
        if not self._background.running or self._max_files <= 0:
            return
        state = self._directories.pop(directory, None) or _Directory()
        self._directories[directory] = state
        while len(self._directories) > DIRECTORIES:
            _, dropped = self._directories.popitem(last=False)
            self._restart(dropped)
        if state.listed is not listed:  # listed anew: positions (and the window) start again
            self._restart(state)
            state.listed, state.positions = listed, {entry.did: i for i, entry in enumerate(listed)}
            state.last = NOWHERE
        index = state.positions.get(info.did)
        if index is None:
            return
        if state.last < index <= state.last + STRIDE:
            state.streak += 1
        else:
            self._restart(state)
            state.ahead = index
        state.last = index
        if state.streak >= STREAK:
            self._fill(state)

    def statistics(self) -> dict[str, Any]:
        counts = {key: self.counters[key] for key in ("started", "done", "failed", "cancelled")}
        return {**counts, "in_flight": sum(len(d.in_flight) for d in self._directories.values())}

    def _restart(self, state: _Directory) -> None:
        """The reader left the pattern: cancel what runs ahead of it."""
        self.counters["cancelled"] += len(state.in_flight)
        for scope in state.in_flight.values():
            scope.cancel()
        state.in_flight, state.streak = {}, 0

    def _fill(self, state: _Directory) -> None:
        """Start fetches for the files after the reader, up to the window's bounds in files and bytes."""
        end = min(len(state.listed), state.last + 1 + self._max_files)
        for index in range(max(state.ahead, state.last) + 1, end):
            info = state.listed[index]
            if info.type is DIDType.FILE and info.size and info.size <= self._max_bytes:
                if state.bytes_in_flight() + info.size > self._max_bytes:
                    return  # the next open moves the window on
                scope = state.in_flight[index] = trio.CancelScope()
                self.counters["started"] += 1
                self._background.start_soon(self._fetch, state, scope, index, info)
            # a bigger file is streamed by the reader's own read-ahead, never fetched whole ahead of it
            state.ahead = index

    async def _fetch(self, state: _Directory, scope: trio.CancelScope, index: int, info: DIDInfo) -> None:
        try:
            with scope:
                await self._content.warm(info)
                self.counters["done"] += 1
        except Exception as exc:  # the reader's own open meets it; the background must not fail
            self.counters["failed"] += 1
            log.debug("prefetch of %s failed: %s", info.did, exc)
        finally:
            if state.in_flight.get(index) is scope:  # still this window's: not cancelled meanwhile
                del state.in_flight[index]
