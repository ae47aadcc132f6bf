"""What the filesystem needs from the data services, as protocols.

The filesystem reads file content through a :class:`FileContent` service (stream mode, rule
staging, or the hybrid of both) without knowing which one it is; the composition root picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from datalakefs.model import DIDInfo, ReadBuffer


class OpenFile(Protocol):
    """One open file of the lake. ``read`` returns fewer bytes than asked only at end of file."""

    @property
    def keep_cache(self) -> bool:
        """Whether the kernel may keep this file's pages across opens."""
        ...

    async def read(self, offset: int, size: int) -> ReadBuffer: ...

    async def close(self) -> None: ...


class FileContent(Protocol):
    async def open(self, info: DIDInfo, nonblocking: bool) -> OpenFile:
        """Prepare ``info`` for reading; no data moves in stream mode. Rule staging may wait here
        (or raise ``TryAgainError`` when ``nonblocking``)."""
        ...

    def cached_bytes(self, info: DIDInfo) -> int:
        """How many bytes of the file are in the local cache."""
        ...

    def state(self, info: DIDInfo) -> str:
        """A one-line staging state for ``user.datalakefs.state`` (never a credential)."""
        ...

    async def clear(self) -> None:
        """Drop everything in the local block cache (``datalakefs cache clear``)."""
        ...

class Warm(Protocol):
    def warmed(self, info: DIDInfo) -> bool:
        """Whether :meth:`warm` has nothing to do: the file is whole in the local cache, or the policy
        reads it from elsewhere."""
        ...

    async def warm(self, info: DIDInfo) -> None:
        """Fetch the whole file into the local cache ahead of a reader (nothing when it is there, or
        when the policy reads it from elsewhere)."""
        ...

    async def page_in(self, infos: Sequence[DIDInfo]) -> None:
        """Have those of ``infos`` that are in the local cache read from its disk into memory ahead of
        a reader, all at once (nothing for the others)."""
        ...


class StageRequests(Protocol):
    async def stage(self, info: DIDInfo, value: bytes) -> None:
        """``setxattr user.datalakefs.stage``: stage a file or a whole collection with one rule."""
        ...

    async def look_up(self, info: DIDInfo) -> None:
        """Learn the rules the lake already has for ``info`` (whoever made them) before its state is read."""
        ...
