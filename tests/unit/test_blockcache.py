"""The block cache: format, verified reads, corruption, restart, eviction, whole-file check."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datalakefs.cache.layout import (
    HEADER_SIZE,
    PAGE_SIZE,
    BlockHeader,
    CorruptBlockError,
    FileKey,
    adler32_combine,
    block_name,
    pack_header,
    parse_header,
)
from datalakefs.cache.store import BlockCache, VerifyResult
from datalakefs.cache.writer import LandedBlock
from datalakefs.errors import ConfigError
from datalakefs.model import DID

BS = 1 << 20
BLOCK_BYTES = BS + HEADER_SIZE
DATA = random.Random(3).randbytes(5 * BS + 4321)  # 6 blocks, the last one short


def key_of(data: bytes, name: str = "secret-name.root", adler: int | None = None) -> FileKey:
    return FileKey(DID("scope", name), len(data), f"adler32:{zlib.adler32(data) if adler is None else adler:08x}")


def new_cache(root: Path, capacity: int = 1 << 30) -> BlockCache:
    cache = BlockCache(root, capacity=capacity, block_size=BS)
    cache.load()
    return cache


def put(cache: BlockCache, key: FileKey, data: bytes, first: int, end: int, seed: int = 0) -> list[LandedBlock]:
    """Write blocks ``[first, end)`` through a writer in random-sized chunks and commit them."""
    rng = random.Random(seed)
    landed: list[LandedBlock] = []
    writer = cache.writer(key, first, end, landed.append)
    pos, stop = first * BS, min(len(data), end * BS)
    while pos < stop:
        n = min(rng.randrange(1, 300_000), stop - pos)
        writer.write(pos, data[pos : pos + n])
        pos += n
    writer.close()
    for block in landed:
        if block.data is None:
            cache.commit(key, block)
    return landed


def block_path(cache: BlockCache, key: FileKey, index: int) -> str:
    return os.path.join(cache.directory(key), block_name(index))


def test_blocks_round_trip_verified_and_private(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    landed = put(cache, key, DATA, 0, 6)
    assert [b.index for b in landed] == list(range(6))
    assert all(b.data is None for b in landed)
    rng = random.Random(1)
    for _ in range(300):
        index = rng.randrange(6)
        length = min(BS, len(DATA) - index * BS)
        start = rng.randrange(length)
        size = rng.randrange(1, length - start + 1)
        got = cache.read(key, index, start, size)
        assert got == DATA[index * BS + start : index * BS + start + size]
    assert cache.cached_bytes(key) == len(DATA)
    assert cache.is_complete(key)
    for dirpath, _dirnames, filenames in os.walk(tmp_path / "v1"):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700
        assert "secret-name" not in dirpath
        for name in filenames:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode) == 0o600
            assert "secret-name" not in name
    cache.close()


def test_partial_block_is_never_visible(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    landed: list[LandedBlock] = []
    writer = cache.writer(key, 0, 2, landed.append)
    writer.write(0, DATA[: BS + 1000])
    writer.close()  # the transfer died inside block 1
    assert [b.index for b in landed] == [0]
    assert sorted(os.listdir(cache.directory(key))) == [block_name(0)]


@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_adler32_combine_matches_zlib(a: bytes, b: bytes) -> None:
    assert adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)


@given(st.integers(min_value=0, max_value=8 + 32 + 8 + 8 + 4 * 4 + 16 * 4 + 3), st.integers(1, 255))
def test_any_damage_to_a_header_is_detected(position: int, flip: int) -> None:
    key = key_of(DATA)
    header = BlockHeader(2, BS, 12345, bytes(range(64)))
    raw = bytearray(pack_header(key, BS, header))
    assert parse_header(bytes(raw), key, BS, 2) == header
    raw[position] ^= flip
    with pytest.raises(CorruptBlockError):
        parse_header(bytes(raw), key, BS, 2)


def test_header_of_another_file_or_block_is_rejected() -> None:
    key = key_of(DATA)
    raw = pack_header(key, BS, BlockHeader(2, BS, 1, bytes(64)))
    with pytest.raises(CorruptBlockError, match="another"):
        parse_header(raw, key, BS, 3)
    with pytest.raises(CorruptBlockError, match="another"):
        parse_header(raw, key_of(DATA, name="other"), BS, 2)


def _flip_data(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.seek(HEADER_SIZE + 3 * PAGE_SIZE + 17)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 1]))


def _flip_header(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.seek(60)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 1]))


def _truncate(path: str) -> None:
    os.truncate(path, HEADER_SIZE + BS // 2)


def _zero_tail(path: str) -> None:  # what a crash without fsync can leave behind
    with open(path, "r+b") as fh:
        fh.seek(HEADER_SIZE + BS - PAGE_SIZE)
        fh.write(bytes(PAGE_SIZE))


def _replace_with_block_1(path: str) -> None:
    shutil.copyfile(os.path.join(os.path.dirname(path), block_name(1)), path)


def _delete(path: str) -> None:
    os.unlink(path)


DAMAGE = [_flip_data, _flip_header, _truncate, _zero_tail, _replace_with_block_1, _delete]


@pytest.mark.parametrize("restart", [False, True], ids=["live", "after-restart"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_block_is_dropped_never_served(tmp_path: Path, damage: object, restart: bool) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 6)
    assert cache.read(key, 2, 0, BS) == DATA[2 * BS : 3 * BS]  # header loaded, descriptor cached
    damage(block_path(cache, key, 2))  # type: ignore[operator]
    if restart:
        cache.close()
        cache = new_cache(tmp_path)
    got = cache.read(key, 2, 0, BS)
    if got is not None:
        # Live, the header was already checked and kept, and an unlinked file stays readable through
        # its open descriptor: damage that leaves the data intact may go unnoticed, but only the right
        # bytes can come back.
        assert not restart and damage in (_flip_header, _delete)
        assert got == DATA[2 * BS : 3 * BS]
        return
    assert not cache.has_block(key, 2)
    assert not os.path.exists(block_path(cache, key, 2))
    assert cache.statistics().corrupt_blocks == (0 if restart and damage in (_truncate, _delete) else 1)
    assert cache.read(key, 3, 0, BS) == DATA[3 * BS : 4 * BS]
    assert cache.cached_bytes(key) == len(DATA) - BS
    cache.close()


def test_restart_rebuilds_accounting_and_drops_debris(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key, other = key_of(DATA), key_of(DATA, name="other")
    put(cache, key, DATA, 0, 6)
    put(cache, other, DATA, 0, 2)
    used = cache.statistics().used_bytes
    assert used == 8 * BLOCK_BYTES - (BS - len(DATA) % BS)
    directory = cache.directory(key)
    Path(directory, ".0000000007.abcd.tmp").write_bytes(b"torn")
    Path(directory, "junk").write_bytes(b"?")
    os.unlink(os.path.join(cache.directory(other), "meta"))  # a file without its index is dropped
    (tmp_path / "v1" / "zz-not-a-prefix").mkdir()
    (tmp_path / ".v1-trash-0123").mkdir()
    cache.close()

    again = new_cache(tmp_path)
    stats = again.statistics()
    assert (stats.files, stats.blocks, stats.used_bytes) == (1, 6, used - 2 * BLOCK_BYTES)
    assert sorted(os.listdir(directory)) == sorted(["meta"] + [block_name(i) for i in range(6)])
    assert not os.path.exists(again.directory(other))
    assert sorted(os.listdir(tmp_path)) == ["v1"]
    assert again.read(key, 5, 0, len(DATA) % BS) == DATA[5 * BS :]
    again.close()


def test_lru_eviction_between_watermarks(tmp_path: Path) -> None:
    cache = new_cache(tmp_path, capacity=10 * BLOCK_BYTES)  # evict above 9.5 blocks, down to 9
    data = random.Random(5).randbytes(12 * BS)
    key = key_of(data)
    put(cache, key, data, 0, 9)
    assert cache.read(key, 0, 0, 10) == data[:10]  # block 0 is now the most recently used
    put(cache, key, data, 9, 10)
    present = [i for i in range(12) if cache.has_block(key, i)]
    assert present == [0, *range(2, 10)]
    stats = cache.statistics()
    assert (stats.evictions, stats.evicted_bytes, stats.used_bytes) == (1, BLOCK_BYTES, 9 * BLOCK_BYTES)
    put(cache, key, data, 10, 12)
    assert cache.statistics().used_bytes <= 9.5 * BLOCK_BYTES
    assert cache.has_block(key, 11) and cache.has_block(key, 10)
    cache.close()


def test_restart_over_capacity_evicts_least_recently_touched_file(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    old, new = key_of(DATA, name="old"), key_of(DATA, name="new")
    put(cache, old, DATA, 0, 3)
    put(cache, new, DATA, 0, 3)
    os.utime(os.path.join(cache.directory(old), "meta"), (1, 1))
    cache.close()
    smaller = new_cache(tmp_path, capacity=4 * BLOCK_BYTES)
    assert [smaller.has_block(old, i) for i in range(3)] == [False, False, False]
    assert [smaller.has_block(new, i) for i in range(3)] == [True, True, True]
    smaller.close()


async def test_whole_file_verification(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 5)
    assert await cache.verify(key) is VerifyResult.INCOMPLETE
    put(cache, key, DATA, 5, 6)
    assert await cache.verify(key) is VerifyResult.VERIFIED
    assert cache.is_verified(key)
    cache.close()

    again = new_cache(tmp_path)  # the verdict survives a restart ...
    assert again.is_verified(key)
    assert again.read(key, 0, 0, 1) == DATA[:1]
    again.close()
    meta = Path(again.directory(key), "meta")
    meta.write_text(meta.read_text().replace('"verified": true', '"verified": false'))
    third = new_cache(tmp_path)  # ... and without it, headers are read back (in a thread) to check
    assert await third.verify(key) is VerifyResult.VERIFIED
    third.close()


async def test_mismatch_drops_every_block_of_the_file(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    wrong = key_of(DATA, adler=zlib.adler32(DATA) ^ 1)
    put(cache, wrong, DATA, 0, 6)
    assert await cache.verify(wrong) is VerifyResult.MISMATCH
    assert cache.cached_bytes(wrong) == 0
    assert not os.path.exists(cache.directory(wrong))
    assert cache.statistics().checksum_mismatches == 1
    md5_key = FileKey(DID("scope", "m"), len(DATA), "md5:00")
    put(cache, md5_key, DATA, 0, 6)
    assert await cache.verify(md5_key) is VerifyResult.UNVERIFIABLE
    cache.close()


def test_refetched_block_replaces_the_old_one(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 6)
    assert cache.read(key, 1, 0, 100) == DATA[BS : BS + 100]
    used = cache.statistics().used_bytes
    put(cache, key, DATA, 1, 2, seed=9)
    assert cache.statistics().used_bytes == used
    assert cache.read(key, 1, 0, BS) == DATA[BS : 2 * BS]
    cache.close()


def test_disk_failure_hands_blocks_over_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    real_pwrite = os.pwrite
    calls = 0

    def failing_pwrite(fd: int, data: bytes, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 12:  # somewhere inside block 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    landed = put(cache, key, DATA, 0, 4)
    monkeypatch.undo()
    assert [b.index for b in landed] == [0, 1, 2, 3]
    in_memory = [b for b in landed if b.data is not None]
    assert in_memory and all(b.errno == errno.ENOSPC for b in in_memory)
    for block in in_memory:
        assert block.data == DATA[block.index * BS : (block.index + 1) * BS]
    assert not any(name.endswith(".tmp") for name in os.listdir(cache.directory(key)))
    cache.close()


async def test_clear_empties_the_cache(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 6)
    await cache.clear()
    assert cache.read(key, 0, 0, 10) is None
    assert cache.statistics().used_bytes == 0
    assert os.listdir(tmp_path / "v1") == []
    put(cache, key, DATA, 0, 1)  # and it still works afterwards
    assert cache.read(key, 0, 0, 10) == DATA[:10]
    cache.close()


def test_shrink_frees_a_fraction(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 6)
    freed = cache.shrink(0.3)
    assert freed >= 0.3 * (len(DATA) + 6 * HEADER_SIZE) - BLOCK_BYTES
    assert not cache.has_block(key, 0) and cache.has_block(key, 5)
    cache.close()


@pytest.mark.parametrize("size", [0, 1000, 3 * BS // 2, 64 * BS])
def test_block_size_must_be_whole_mebibytes_up_to_32(tmp_path: Path, size: int) -> None:
    with pytest.raises(ConfigError, match="block_size"):
        BlockCache(tmp_path, capacity=1 << 30, block_size=size)
