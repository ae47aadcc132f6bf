"""An open file in stream mode: its read-ahead window and its reads; see the package docstring."""

from __future__ import annotations

from datalakefs.cache.layout import FileKey, block_count
from datalakefs.model import ReadBuffer
from datalakefs.staging.stream.fetch import StreamService
from datalakefs.transport.failover import Locate, ReplicaChoice


class StreamReader:
    """One open file in stream mode (the filesystem's ``OpenFile``)."""

    keep_cache = True  # files are immutable: the kernel may keep their pages across opens

    def __init__(self, service: StreamService, key: FileKey, locate: Locate) -> None:
        self.key = key
        self.size = key.size
        self._service = service
        self.replicas = ReplicaChoice(key.did, locate, service.config)
        self._blocks = block_count(key.size, service.block_size)
        self._next = 0  # furthest offset read so far in the current sequential stretch
        self._far = -1  # furthest block reached in it
        self._window = service.block_size
        self._ahead = 0  # blocks before this index are cached or requested
        self._start = 0  # the block the current sequential stretch started at

    async def read(self, offset: int, size: int) -> ReadBuffer:
        """Up to ``size`` bytes at ``offset`` (fewer only at end of file); raises TransferError (EIO).

        A read inside one block returns the block's bytes as they are held (a view of a block in
        memory: no copy). A read across blocks copies each block's part as it gets it, before waiting
        for the next: a view held across that wait could see its buffer released and reused."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        service = self._service
        bs = service.block_size
        first, last = offset // bs, (end - 1) // bs
        if not self._plan(offset, end, first, last):
            if end - offset <= service.piece_max:
                small = await service.read_small(self, offset, end)
                if small is not None:
                    return small
            service.request(self, first, last + 1)
        if first == last:
            data = await service.read_block(self, first, offset - first * bs, end - offset)
        else:
            data = bytearray(end - offset)
            for index in range(first, last + 1):
                start = max(offset - index * bs, 0)
                length = min(end - index * bs, bs) - start
                at = index * bs + start - offset
                data[at : at + length] = await service.read_block(self, index, start, length)
        await service.verify_when_complete(self.key)
        return data

    async def fill(self) -> None:
        """Bring the whole file into the cache (and verify it) without reading it out: a warm."""
        if not self._blocks:
            return
        service = self._service
        service.request(self, 0, self._blocks)
        for index in range(self._blocks):
            await service.wait_stored(self, index)
        await service.verify_when_complete(self.key)

    def _plan(self, offset: int, end: int, first: int, last: int) -> bool:
        """Classify the access and grow or reset the window; a sequential reader's window is requested
        here. Returns whether the access is sequential: it starts exactly where the stream's reads end,
        or lies inside what the stream's window already requested (the kernel's read-ahead may arrive
        slightly out of order). Any other read is random and fetches only what it touches."""
        service = self._service
        bs = service.block_size
        if offset == self._next or (self._start <= first and last < self._ahead):
            if last > self._far:
                self._window = min(self._window * 2, service.window_limit(self))
                self._far = last
            self._next = max(self._next, end)
            window_blocks = self._window // bs
            if self._ahead - (last + 1) < window_blocks // 2:
                self._ahead = min(self._blocks, last + 1 + window_blocks)
                service.request(self, first, self._ahead)
            else:
                service.request(self, first, last + 1)
            if self._ahead == self._blocks:
                service.stream_ended(self)  # everything left is requested: nothing more to read ahead
            return True
        service.stream_ended(self)
        self._window, self._far, self._next, self._ahead, self._start = bs, last, end, 0, first
        return False

    async def close(self) -> None:
        """Forget the handle; transfers it started go on for whoever else waits, and stay cached."""
        self._service.stream_ended(self)
        self._service.cache.touch(self.key)


