"""A collection's content as the catalogue's answer arrives, shared by everyone who asked for it.

A listing of 100,000 files takes the server, the wire and our parsing about a second; a directory
served only once all of it is in makes ``ls`` wait for all of that before its first entry. A
:class:`ContentStream` holds the rows received so far, in the catalogue's order, and grows as each
batch (one received chunk) is parsed on the worker thread, so that readers are served from its
first rows while the rest arrives. Every index, once valid, keeps its row: the rows are only ever
appended to. The stream ends once, with the whole answer (``content``, as the cache keeps it) or with
an error (``error``: the rows received before it stay readable).

Used on the trio thread only; the worker thread reading the answer hands each batch over with
``run_sync_soon`` (:meth:`extend`), in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from datalakefs.errors import DatalakeError
from datalakefs.model import DIDInfo


class ContentStream:
    """The rows of one listing, growing until the answer ends (see the module docstring)."""

    __slots__ = ("_arrived", "_received", "abandoned", "content", "error", "rows")

    def __init__(self) -> None:
        self._received: list[DIDInfo] = []
        #: every row so far, in order (append-only)
        self.rows: Sequence[DIDInfo] = self._received
        #: the whole answer once it ended well (the cache's tuple; ``rows`` is then the same tuple)
        self.content: tuple[DIDInfo, ...] | None = None
        self.error: DatalakeError | None = None
        #: set when nobody reads the answer any more: the worker thread stops at its next batch
        self.abandoned = False
        self._arrived = trio.lowlevel.ParkingLot()

    @classmethod
    def answered(cls, content: tuple[DIDInfo, ...]) -> ContentStream:
        """A stream that has ended with ``content`` (a cached answer)."""
        stream = cls()
        stream.rows = stream.content = content
        return stream

    @property
    def ended(self) -> bool:
        return self.content is not None or self.error is not None

    def extend(self, batch: list[DIDInfo]) -> None:
        """Rows that arrived (a ``run_sync_soon`` callback: it must not raise)."""
        if not self.ended:
            self._received += batch
            self._arrived.unpark_all()

    def finish(self, content: tuple[DIDInfo, ...]) -> None:
        """The answer ended well; ``content`` holds every row, as cached."""
        self.rows = self.content = content
        self._received = []
        self._arrived.unpark_all()

    def fail(self, error: DatalakeError) -> None:
        self.error = error
        self.abandoned = True
        self._arrived.unpark_all()

    async def grown(self, count: int) -> None:
        """Return once the stream holds more than ``count`` rows or has ended."""
        while len(self.rows) <= count and not self.ended:
            await self._arrived.park()

    async def whole(self) -> tuple[DIDInfo, ...]:
        """The whole answer, once it has ended; its error (a copy per caller) if it failed."""
        while not self.ended:
            await self.grown(len(self.rows))
        if self.content is None:
            assert self.error is not None
            raise self.error.anew() from self.error
        return self.content
