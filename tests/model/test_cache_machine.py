"""A hypothesis state machine drives the block cache against a reference model.

The model knows which blocks were written (``valid``) and which of their files were damaged behind the
cache's back (``tainted``). Whatever happens (writes, reads, eviction, damage of every kind, restarts,
whole-file checks, clearing), the cache must:

* never return bytes other than the file's, and return them for every intact block it holds;
* hold only blocks that were written, account their bytes exactly and stay under its high watermark;
* count each block that vanished without being read as corrupt as an eviction;
* keep every intact block across a restart; verify complete files and reject a wrong checksum;
* never serve a block whose transfer stored it but died before its journal record (a crash), and leave
  no entry on disk after a restart for a file of which it holds nothing (a data file without journal).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import zlib
from pathlib import Path

import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from datalakefs.cache.layout import FileKey, block_count, block_length
from datalakefs.cache.store import BlockCache, VerifyResult
from datalakefs.cache.writer import LandedBlock
from datalakefs.model import DID

BS = 1 << 20
CAPACITY = 4 * BS
HIGH = 0.95
SIZES = {"a": 2 * BS + BS // 2, "b": BS, "c": 100_000, "wrong": BS + 7}
DATA = {name: random.Random(name).randbytes(size) for name, size in SIZES.items()}
KEYS = {
    name: FileKey(
        DID("s", name), len(data), f"adler32:{zlib.adler32(data) ^ (1 if name == 'wrong' else 0):08x}"
    )
    for name, data in DATA.items()
}
BLOCKS = [(name, i) for name in SIZES for i in range(block_count(SIZES[name], BS))]

files = st.sampled_from(sorted(SIZES))
blocks = st.sampled_from(BLOCKS)


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="dlfs-cache-machine-"))
        self.cache = self._open()
        self.valid: set[tuple[str, int]] = set()
        self.tainted: set[tuple[str, int]] = set()
        self.damaged_journals: set[str] = set()  # their blocks, even ones added later, may be lost at restart

    def _open(self) -> BlockCache:
        cache = BlockCache(self.root, capacity=CAPACITY, block_size=BS, high_watermark=HIGH, low_watermark=0.9)
        cache.load()
        return cache

    def teardown(self) -> None:
        self.cache.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def held(self) -> set[tuple[str, int]]:
        return {(name, i) for name, i in BLOCKS if self.cache.has_block(KEYS[name], i)}

    def _data(self, name: str) -> str:
        return self.cache.data_path(KEYS[name])

    @rule(name=files, data=st.data())
    def put(self, name: str, data: st.DataObject) -> None:
        n = block_count(SIZES[name], BS)
        first = data.draw(st.integers(0, n - 1))
        end = data.draw(st.integers(first + 1, n))
        chunk = data.draw(st.integers(1000, 400_000))
        landed: list[LandedBlock] = []
        writer = self.cache.writer(KEYS[name], first, end, landed.append)
        pos, stop = first * BS, min(SIZES[name], end * BS)
        while pos < stop:
            step = min(chunk, stop - pos)
            writer.write(pos, DATA[name][pos : pos + step])
            pos += step
        writer.close()
        writer.drained.result(timeout=10)  # the disk thread's last writes
        assert [b.index for b in landed] == list(range(first, end))
        evicted_meanwhile: set[tuple[str, int]] = set()  # old copies of this put's blocks, evicted by its commits
        for block in landed:
            before, evictions = self.held(), self.cache.statistics().evictions
            if not self.cache.commit(KEYS[name], block):
                # Only a block whose old copy an earlier commit of this put evicted (its hole may have
                # taken the rewritten bytes) may be refused; it is then not cached.
                assert (name, block.index) in evicted_meanwhile, "a stored block was refused"
                assert not self.cache.has_block(KEYS[name], block.index)
                self.valid.discard((name, block.index))
                continue
            after = self.held()
            assert (name, block.index) in after  # the block just committed is never the one evicted
            # Every block that vanished was evicted, except damaged ones the cache may have dropped.
            evicted = self.cache.statistics().evictions - evictions
            assert len(before - after - self.tainted) <= evicted <= len(before - after)
            evicted_meanwhile |= {b for b in before - after if b[0] == name}
            self.valid.add((name, block.index))
            self.tainted.discard((name, block.index))  # the rename put a fresh file in place
            self.valid &= after
            self.tainted &= after

    @rule(block=blocks, data=st.data())
    def read(self, block: tuple[str, int], data: st.DataObject) -> None:
        name, index = block
        length = block_length(SIZES[name], BS, index)
        start = data.draw(st.integers(0, length - 1))
        size = data.draw(st.integers(1, length - start))
        corrupt = self.cache.statistics().corrupt_blocks
        got = self.cache.read(KEYS[name], index, start, size)
        if got is not None:
            assert block in self.valid
            assert got == DATA[name][index * BS + start : index * BS + start + size]
            return
        assert block not in self.valid or block in self.tainted, "an intact block was not served"
        assert not self.cache.has_block(KEYS[name], index)
        if block in self.valid:
            assert self.cache.statistics().corrupt_blocks == corrupt + 1
        self.valid.discard(block)
        self.tainted.discard(block)

    @precondition(lambda self: bool(self.valid))
    @rule(data=st.data(), kind=st.sampled_from(["flip", "zero", "swap", "truncate", "delete", "journal"]))
    def damage(self, data: st.DataObject, kind: str) -> None:
        on_disk = sorted(b for b in self.valid if os.path.exists(self._data(b[0])))
        if not on_disk:
            return
        name, index = data.draw(st.sampled_from(on_disk))
        path = self._data(name)
        start, length = index * BS, block_length(SIZES[name], BS, index)
        whole_file = {(n, i) for n, i in self.valid if n == name}
        if kind == "delete":
            os.unlink(path)
            self.tainted |= whole_file
        elif kind == "truncate":
            size = data.draw(st.integers(0, start + length - 1))
            os.truncate(path, size)
            self.tainted |= {(n, i) for n, i in whole_file if i * BS + block_length(SIZES[n], BS, i) > size}
        elif kind == "journal":
            # a file of one block has its journal behind its bytes in its data file (cache/layout.py)
            single = block_count(SIZES[name], BS) == 1
            journal, start = (path, SIZES[name]) if single else (self.cache.index_path(KEYS[name]), 0)
            if os.path.getsize(journal) <= start:
                return  # truncated into its bytes: no journal left to damage
            with open(journal, "r+b") as fh:
                fh.seek(data.draw(st.integers(start, os.path.getsize(journal) - 1)))
                old = fh.read(1)
                fh.seek(-1, os.SEEK_CUR)
                fh.write(bytes([old[0] ^ 0x40]))
            self.tainted |= whole_file  # whatever the journal lists after the damage is forgotten
            self.damaged_journals.add(name)
        else:
            if kind == "swap":
                other = data.draw(st.sampled_from(on_disk))
                with open(self._data(other[0]), "rb") as fh:
                    fh.seek(other[1] * BS)
                    replacement = fh.read(length)
                if replacement == DATA[name][start : start + length]:
                    return
                position = start
            elif kind == "flip":
                position = start + data.draw(st.integers(0, length - 1))
            else:
                position = start + data.draw(st.integers(0, length - 1)) // 4096 * 4096
            with open(path, "r+b") as fh:
                fh.seek(position)
                old = fh.read(4096 if kind == "zero" else 1)
                if not old or (kind == "zero" and not any(old)):
                    return  # past the end of a truncated file, or already zero: nothing changes
                fh.seek(position)
                if kind == "swap":
                    fh.write(replacement)
                else:
                    fh.write(bytes(len(old)) if kind == "zero" else bytes([old[0] ^ 0x40]))
            self.tainted.add((name, index))

    @rule(name=files, data=st.data())
    def crash_before_commit(self, name: str, data: st.DataObject) -> None:
        """A transfer stored a block, then the daemon died before journaling it."""
        index = data.draw(st.integers(0, block_count(SIZES[name], BS) - 1))
        start = index * BS
        writer = self.cache.writer(KEYS[name], index, index + 1, lambda landed: None)
        writer.write(start, DATA[name][start : start + block_length(SIZES[name], BS, index)])
        writer.close()
        writer.drained.result(timeout=10)

    @rule()
    def restart(self) -> None:
        self.cache.close()
        self.cache = self._open()
        held = self.held()
        may_lose = self.tainted | {b for b in self.valid if b[0] in self.damaged_journals}
        assert self.valid - may_lose <= held, "an intact block was lost in a restart"
        self.valid &= held
        self.tainted &= held
        self.damaged_journals.clear()  # load() rewrote or removed them
        for name in SIZES:
            if not any(n == name for n, _ in held):
                key = KEYS[name]
                assert not os.path.exists(self.cache.data_path(key)), "a data file without blocks stayed"
                assert not os.path.exists(self.cache.index_path(key))

    @rule(name=files)
    def verify(self, name: str) -> None:
        key = KEYS[name]
        complete = self.cache.is_complete(key)
        result = self.cache.verify(key)
        if not complete:
            assert result is VerifyResult.INCOMPLETE
        elif name == "wrong":
            assert result in (VerifyResult.MISMATCH, VerifyResult.INCOMPLETE)
            assert self.cache.cached_bytes(key) == 0 or result is VerifyResult.INCOMPLETE
        elif not any(b[0] == name for b in self.tainted):
            assert result is VerifyResult.VERIFIED
        else:
            assert result in (VerifyResult.VERIFIED, VerifyResult.INCOMPLETE)
        held = self.held()
        self.valid &= held
        self.tainted &= held

    @rule()
    def clear(self) -> None:
        trio.run(self.cache.clear)
        assert self.held() == set()
        self.valid.clear()
        self.tainted.clear()
        self.damaged_journals.clear()

    @invariant()
    def accounting(self) -> None:
        held = self.held()
        assert held <= self.valid | self.tainted
        assert self.valid <= held
        stats = self.cache.statistics()
        expected = sum(block_length(SIZES[n], BS, i) for n, i in held)
        assert stats.used_bytes == expected
        assert stats.used_bytes <= HIGH * CAPACITY
        assert stats.blocks == len(held)
        for name in SIZES:
            cached = sum(block_length(SIZES[name], BS, i) for n, i in held if n == name)
            assert self.cache.cached_bytes(KEYS[name]) == cached


CacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestCacheMachine = CacheMachine.TestCase
