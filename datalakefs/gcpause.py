"""Python's cyclic garbage collector paused while a large listing is built.

A listing of 100,000 files makes about half a million long-lived objects (each row's info and DID,
each entry's node) in a fraction of a second. The collector, started by allocation counts, walks
them again and again while they are made, and then the whole heap each time the long-lived objects
grew by a quarter: about a third of the CPU time of parsing a listing and of building its nodes
(measured in process on 100,000 rows), though none of it can find garbage, since nothing built
there refers back to itself. Such a build runs inside ``with gc_paused:``. The collector is one per
process and builds run on worker threads and the trio thread alike, so pauses are counted: the
collector runs again when the last one ends (unless it was off before the first). What was made
meanwhile is looked at by the next collections as usual. Never hold a pause across an ``await``:
only around work that allocates and ends.
"""

from __future__ import annotations

import gc
import threading
from types import TracebackType


class _CollectorPauses:
    """The context manager behind :data:`gc_paused` (reentrant, thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pauses = 0
        self._resume = False

    def __enter__(self) -> None:
        with self._lock:
            if self._pauses == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._pauses += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with self._lock:
            self._pauses -= 1
            if self._pauses == 0 and self._resume:
                gc.enable()


#: ``with gc_paused:`` around a bulk build (see the module docstring)
gc_paused = _CollectorPauses()
