"""Listing-order prefetch: a reader going through a directory's files finds the next ones cached.

A notebook loop or ``cat *`` opens a dataset's files one after the other in listing order, and each
cold file costs a full round trip to the storage before its first byte. When the opens of one
directory follow its listing (each the next file, or one or two further on), the next files are
fetched whole into the block cache in the background, several at once:

* **bounded**: at most ``listing_prefetch_files`` files ahead of the reader and
  ``listing_prefetch_bytes`` in flight and ahead; a file bigger than that budget is never prefetched
  (the reader's own read-ahead streams it);
* **one window per reader**: several readers may go through one directory at once (a job's workers
  each given a part of the listing), so each directory follows up to :data:`STREAMS` streams of opens;
  an open continues the stream it follows, or starts a new one. Not one stream per process: a shell
  loop opens each file from a new process;
* **dropped when the pattern breaks**: a stream that no open continues while :data:`STREAMS` newer
  ones start (a random reader's opens each start one) is dropped and its fetches in flight are
  cancelled, so a random reader never pays for long for files it will not read; a directory not read
  for a while is forgotten (only the last :data:`DIRECTORIES` directories are followed);
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

#: Opens in listing order (after the first) before the prefetch starts: one open is no pattern.
STREAK: Final = 1

#: Streams of opens followed per directory: readers going through one directory at once.
STREAMS: Final = 4


@dataclass
class _Stream:
    """What one reader of a directory did last, and the fetches running ahead of it."""

    last: int
    streak: int = 0
    ahead: int = -1  # the last index handed to a fetch
    paged: int = -1  # the last index handed to a page-in
    in_flight: dict[int, trio.CancelScope] = field(default_factory=dict)  # index -> its fetch's scope


@dataclass
class _Directory:
    """A directory's listing and the streams of opens going through it, most recent last."""

    listed: tuple[DIDInfo, ...] = ()
    positions: dict[DID, int] = field(default_factory=dict)  # built once per listing
    streams: list[_Stream] = field(default_factory=list)

    def bytes_in_flight(self) -> int:
        return sum(self.listed[index].size or 0 for stream in self.streams for index in stream.in_flight)

    def continued(self, index: int) -> _Stream | None:
        """The stream an open of ``index`` continues (the nearest behind it), if any."""
        behind = [stream for stream in self.streams if stream.last < index <= stream.last + STRIDE]
        return max(behind, key=lambda stream: stream.last, default=None)


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
            self._drop_streams(dropped, len(dropped.streams))
        if state.listed is not listed:  # listed anew: positions (and the windows) start again
            self._drop_streams(state, len(state.streams))
            state.listed, state.positions = listed, {entry.did: i for i, entry in enumerate(listed)}
        index = state.positions.get(info.did)
        if index is None:
            return
        stream = state.continued(index)
        if stream is None:
            stream = _Stream(last=index, ahead=index)
            self._drop_streams(state, len(state.streams) + 1 - STREAMS)
        else:
            state.streams.remove(stream)
            stream.streak += 1
            stream.last = index
        state.streams.append(stream)
        if stream.streak >= STREAK:
            self._fill(state, stream)

    def statistics(self) -> dict[str, Any]:
        counts = {key: self.counters[key] for key in ("started", "done", "failed", "cancelled", "paged_in")}
        return {**counts, "in_flight": sum(len(s.in_flight) for d in self._directories.values() for s in d.streams)}

    def _drop_streams(self, state: _Directory, count: int) -> None:
        """Drop the ``count`` least recently continued streams: cancel what runs ahead of them."""
        for stream in state.streams[: max(0, count)]:
            self.counters["cancelled"] += len(stream.in_flight)
            for scope in stream.in_flight.values():
                scope.cancel()
            stream.in_flight = {}
        del state.streams[: max(0, count)]

    def _fill(self, state: _Directory, stream: _Stream) -> None:
        """Start fetches for the files after the reader, up to the window's bounds in files and the
        directory's in bytes."""
        end = min(len(state.listed), stream.last + 1 + self._max_files)
        for index in range(max(stream.ahead, stream.last) + 1, end):
            info = state.listed[index]
            # a bigger file is streamed by the reader's own read-ahead, never fetched whole ahead of it
            if self._eligible(info):
                if self._content.warmed(info):
                    if index > stream.paged:
                        self._page_in(state, stream, index)
                elif state.bytes_in_flight() + (info.size or 0) > self._max_bytes:
                    return  # the next open moves the window on
                else:
                    scope = stream.in_flight[index] = trio.CancelScope()
                    self.counters["started"] += 1
                    self._background.start_soon(self._fetch, stream, scope, index, info)
            stream.ahead = index

    def _eligible(self, info: DIDInfo) -> bool:
        return info.type is DIDType.FILE and 0 < (info.size or 0) <= self._max_bytes

    def _page_in(self, state: _Directory, stream: _Stream, index: int) -> None:
        """Have the cached files among the window's worth from ``index`` on read into memory, in one
        page-in: the window reaches a cached file once per window's worth, not per open."""
        end = min(len(state.listed), index + self._max_files)
        batch = [info for info in state.listed[index:end] if self._eligible(info) and self._content.warmed(info)]
        stream.paged = end - 1
        if batch:
            self.counters["paged_in"] += len(batch)
            self._background.start_soon(self._page_in_batch, batch)

    async def _page_in_batch(self, batch: list[DIDInfo]) -> None:
        try:
            await self._content.page_in(batch)
        except Exception as exc:  # the reader reads them from the disk itself; the background must not fail
            log.debug("page-in of %d files failed: %s", len(batch), exc)

    async def _fetch(self, stream: _Stream, scope: trio.CancelScope, index: int, info: DIDInfo) -> None:
        try:
            with scope:
                await self._content.warm(info)
                self.counters["done"] += 1
        except Exception as exc:  # the reader's own open meets it; the background must not fail
            self.counters["failed"] += 1
            log.debug("prefetch of %s failed: %s", info.did, exc)
        finally:
            if stream.in_flight.get(index) is scope:  # still this window's: not cancelled meanwhile
                del stream.in_flight[index]
