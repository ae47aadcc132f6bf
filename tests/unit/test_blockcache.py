"""The block cache: format, verified reads, corruption, restart, eviction, whole-file check."""

from __future__ import annotations

import errno
import os
import random
import stat
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from datalakefs.cache import store as store_module
from datalakefs.cache import writer as writer_module
from datalakefs.cache.layout import (
    PAGE_SIZE,
    TAIL_SIZE,
    BlockRecord,
    CorruptBlockError,
    FileKey,
    RecordType,
    adler32_combine,
    block_record,
    file_record,
    filesystem_type,
    journal_length,
    parse_block_record,
    parse_verified_record,
    read_records,
)
from datalakefs.cache.store import BlockCache, VerifyResult
from datalakefs.cache.writer import ArrivedBlock, LandedBlock
from datalakefs.errors import ConfigError
from datalakefs.model import DID

BS = 1 << 20
DATA = random.Random(3).randbytes(5 * BS + 4321)  # 6 blocks, the last one short


def key_of(data: bytes, name: str = "secret-name.root", adler: int | None = None) -> FileKey:
    value = zlib.adler32(data) if adler is None else adler
    return FileKey(DID("scope", name), len(data), f"adler32:{value:08x}")


def new_cache(root: Path, capacity: int = 1 << 30) -> BlockCache:
    cache = BlockCache(root, capacity=capacity, block_size=BS)
    cache.load()
    return cache


def write(cache: BlockCache, key: FileKey, data: bytes, first: int, end: int, seed: int = 0,
          arrived: list[ArrivedBlock] | None = None) -> list[LandedBlock]:
    """Write blocks ``[first, end)`` through a writer in random-sized chunks (not committed); blocks
    handed over at their arrival go to ``arrived``."""
    rng = random.Random(seed)
    landed: list[LandedBlock] = []
    writer = cache.writer(key, first, end, landed.append, None if arrived is None else arrived.append)
    pos, stop = first * BS, min(len(data), end * BS)
    while pos < stop:
        n = min(rng.randrange(1, 300_000), stop - pos)
        writer.write(pos, data[pos : pos + n])
        pos += n
    writer.close()
    writer.drained.result(timeout=10)  # the disk thread's last writes
    return landed


def put(cache: BlockCache, key: FileKey, data: bytes, first: int, end: int, seed: int = 0,
        arrived: list[ArrivedBlock] | None = None) -> list[LandedBlock]:
    landed = write(cache, key, data, first, end, seed, arrived)
    for block in landed:
        if block.data is None:
            assert cache.commit(key, block)
    return landed


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


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
    unaligned = cache.read(key, 1, 100, 5000)
    assert isinstance(unaligned, memoryview)  # a view of the pages read and checked, not a second copy
    assert unaligned == DATA[BS + 100 : BS + 5100]
    prefix = os.path.dirname(cache.data_path(key))
    assert sorted(os.listdir(prefix)) == [f"{key.digest}.data", f"{key.digest}.index"]  # no directory per file
    for dirpath, _, filenames in os.walk(tmp_path / "v3"):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700
        assert "secret-name" not in dirpath
        for name in filenames:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode) == 0o600
            assert "secret-name" not in name
    cache.close()


def test_unfinished_block_is_never_visible_and_gives_its_space_back(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    landed: list[LandedBlock] = []
    writer = cache.writer(key, 0, 2, landed.append)
    writer.write(0, DATA[: BS + 500_000])
    writer.close()  # the transfer died inside block 1
    writer.drained.result(timeout=10)
    assert [b.index for b in landed] == [0]
    assert cache.commit(key, landed[0])
    assert cache.read(key, 1, 0, 10) is None
    assert allocated(cache.data_path(key)) <= BS + PAGE_SIZE


@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_adler32_combine_matches_zlib(a: bytes, b: bytes) -> None:
    assert adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)


@given(st.data())
def test_any_damage_to_a_record_is_detected(data: st.DataObject) -> None:
    key = key_of(DATA)
    record = BlockRecord(2, BS, 12345, bytes(range(64)))
    journal = file_record(key, BS) + block_record(key, BS, record)
    kinds = [kind for kind, _, _ in read_records(journal)]
    assert kinds == [RecordType.FILE, RecordType.BLOCK]
    assert parse_block_record(list(read_records(journal))[1][1], key, BS) == record
    damaged = bytearray(journal)
    position = data.draw(st.integers(0, len(journal) - 1))
    damaged[position] ^= data.draw(st.integers(1, 255))
    assert len(list(read_records(bytes(damaged)))) < 2


def test_record_of_another_file_or_block_is_rejected() -> None:
    key = key_of(DATA)
    payload = next(read_records(block_record(key, BS, BlockRecord(2, BS, 1, bytes(64)))))[1]
    with pytest.raises(CorruptBlockError, match="another"):
        parse_block_record(payload, key_of(DATA, name="other"), BS)
    short = next(read_records(block_record(key, BS, BlockRecord(5, len(DATA) % BS, 1, bytes(4)))))[1]
    with pytest.raises(CorruptBlockError):
        parse_block_record(short, key, 2 * BS)  # another geometry


def _region(cache: BlockCache, key: FileKey, index: int) -> tuple[str, int]:
    return cache.data_path(key), index * BS


def _flip_data(cache: BlockCache, key: FileKey) -> None:
    path, offset = _region(cache, key, 2)
    with open(path, "r+b") as fh:
        fh.seek(offset + 3 * PAGE_SIZE + 17)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 1]))


def _zero_page(cache: BlockCache, key: FileKey) -> None:  # what a crash without fsync can leave behind
    path, offset = _region(cache, key, 2)
    with open(path, "r+b") as fh:
        fh.seek(offset + BS - PAGE_SIZE)
        fh.write(bytes(PAGE_SIZE))


def _truncate(cache: BlockCache, key: FileKey) -> None:
    path, offset = _region(cache, key, 2)
    os.truncate(path, offset + BS // 2)


def _copy_block_1(cache: BlockCache, key: FileKey) -> None:
    path, offset = _region(cache, key, 2)
    with open(path, "r+b") as fh:
        fh.seek(BS)
        block_1 = fh.read(BS)
        fh.seek(offset)
        fh.write(block_1)


def _delete_data(cache: BlockCache, key: FileKey) -> None:
    os.unlink(cache.data_path(key))


def _damage_index(cache: BlockCache, key: FileKey) -> None:
    path = cache.index_path(key)
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) - 3 * 100)  # inside one of the last block records (blocks 3, 4 or 5)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 1]))


# (damage, blocks found corrupt by live reads, blocks found corrupt by reads after a restart). Damage
# that leaves the data intact is harmless live; after a restart, what load() can tell is damaged
# (truncated data, a missing data file, a damaged journal) is forgotten before anything is read.
DAMAGE: list[tuple[Callable[[BlockCache, FileKey], None], int, int]] = [
    (_flip_data, 1, 1),
    (_zero_page, 1, 1),
    (_truncate, 4, 0),
    (_copy_block_1, 1, 1),
    (_delete_data, 0, 0),
    (_damage_index, 0, 0),
]


@pytest.mark.parametrize("restart", [False, True], ids=["live", "after-restart"])
@pytest.mark.parametrize(("damage", "live_found", "restart_found"), DAMAGE)
def test_damage_is_detected_or_harmless_never_served(
    tmp_path: Path,
    damage: Callable[[BlockCache, FileKey], None],
    live_found: int,
    restart_found: int,
    restart: bool,
) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 6)
    assert cache.read(key, 2, 0, BS) == DATA[2 * BS : 3 * BS]  # the data file is open now
    damage(cache, key)
    if restart:
        cache.close()
        cache = new_cache(tmp_path)
    for index in range(6):
        got = cache.read(key, index, 0, min(BS, len(DATA) - index * BS))
        assert got is None or got == DATA[index * BS : (index + 1) * BS]  # never a wrong byte
    assert cache.statistics().corrupt_blocks == (restart_found if restart else live_found)
    if damage is not _delete_data:
        assert cache.read(key, 0, 0, BS) == DATA[:BS]  # blocks before the damage are intact
    if damage is not _damage_index and (restart or live_found):
        assert not cache.has_block(key, 2)
    cache.close()


def test_restart_rebuilds_accounting_drops_its_debris_and_leaves_what_is_not_cache(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key, other, third = key_of(DATA), key_of(DATA, name="other"), key_of(DATA, name="third")
    put(cache, key, DATA, 0, 6)
    put(cache, other, DATA, 0, 2)
    put(cache, third, DATA, 0, 1)
    assert cache.statistics().used_bytes == len(DATA) + 3 * BS
    prefix = os.path.dirname(cache.data_path(key))
    Path(cache.index_path(key) + ".abcd.tmp").write_bytes(b"torn")
    Path(prefix, "junk").write_bytes(b"?")
    with open(cache.index_path(key), "ab") as fh:
        fh.write(b"DLFS\x02\x00\x00\x00torn tail")  # a record cut short by a crash
    os.unlink(cache.index_path(other))  # data without its journal is dropped
    with open(cache.index_path(third), "r+b") as fh:
        fh.write(b"XXXX")  # a journal that is not ours
    (tmp_path / "v3" / "zz-not-a-prefix").mkdir()
    (tmp_path / ".v3-trash-0123").mkdir()
    (tmp_path / "v1" / "ab" / ("ab" + "0" * 62)).mkdir(parents=True)  # caches of earlier formats
    (tmp_path / "v2" / "ab").mkdir(parents=True)
    (tmp_path / "v2" / "ab" / ("ab" + "0" * 62 + ".data")).write_bytes(b"old")
    cache.close()

    again = new_cache(tmp_path)
    stats = again.statistics()
    assert (stats.files, stats.blocks, stats.used_bytes) == (1, 6, len(DATA))
    assert "junk" in os.listdir(prefix) and not any(n.endswith(".tmp") for n in os.listdir(prefix))
    for gone in (other, third):
        assert not os.path.exists(again.data_path(gone)) and not os.path.exists(again.index_path(gone))
    assert sorted(os.listdir(tmp_path)) == ["v3"]
    assert (tmp_path / "v3" / "zz-not-a-prefix").is_dir()
    assert again.read(key, 5, 0, len(DATA) % BS) == DATA[5 * BS :]
    journal = Path(again.index_path(key)).read_bytes()
    assert [kind for kind, _, _ in read_records(journal)] == [RecordType.FILE, *[RecordType.BLOCK] * 6]
    again.close()


def test_a_cache_root_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    (precious / "ab").mkdir(parents=True)
    (precious / "ab" / "thesis.tex").write_text("years of work")
    (precious / "notes.txt").write_text("more")
    precious.chmod(0o755)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "v3").symlink_to(precious)
    with pytest.raises(ConfigError, match="symbolic link"):
        new_cache(tmp_path / "cache")
    assert (precious / "ab" / "thesis.tex").read_text() == "years of work"
    assert sorted(os.listdir(precious)) == ["ab", "notes.txt"]
    assert stat.S_IMODE(precious.stat().st_mode) == 0o755  # not made private either


def test_lru_eviction_between_watermarks_gives_space_back(tmp_path: Path) -> None:
    cache = new_cache(tmp_path, capacity=10 * BS)  # evict above 9.5 blocks, down to 9
    data = random.Random(5).randbytes(12 * BS)
    key = key_of(data)
    put(cache, key, data, 0, 9)
    assert cache.read(key, 0, 0, 10) == data[:10]  # block 0 is now the most recently used
    put(cache, key, data, 9, 10)
    present = [i for i in range(12) if cache.has_block(key, i)]
    assert present == [0, *range(2, 10)]
    stats = cache.statistics()
    assert (stats.evictions, stats.evicted_bytes, stats.used_bytes) == (1, BS, 9 * BS)
    assert allocated(cache.data_path(key)) <= 9 * BS + PAGE_SIZE
    put(cache, key, data, 10, 12)
    assert cache.statistics().used_bytes <= 9.5 * BS
    assert cache.has_block(key, 11) and cache.has_block(key, 10)
    cache.close()
    again = new_cache(tmp_path, capacity=10 * BS)  # evictions were journaled
    assert [i for i in range(12) if again.has_block(key, i)] == [i for i in range(12) if cache.has_block(key, i)]
    again.close()


def test_restart_over_capacity_evicts_least_recently_touched_file(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    old, new = key_of(DATA, name="old"), key_of(DATA, name="new")
    put(cache, old, DATA, 0, 3)
    put(cache, new, DATA, 0, 3)
    cache.touch(new)
    os.utime(cache.index_path(old), (1, 1))
    cache.close()
    smaller = new_cache(tmp_path, capacity=4 * BS)
    assert [smaller.has_block(old, i) for i in range(3)] == [False, False, False]
    assert [smaller.has_block(new, i) for i in range(3)] == [True, True, True]
    smaller.close()


def test_touch_skips_a_journal_the_cache_wrote_or_touched_recently(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 1)
    index = cache.index_path(key)
    os.utime(index, (1, 1))
    cache.touch(key)  # the cache wrote the journal just now: no utime per reader's close
    assert os.stat(index).st_mtime == 1
    cache.close()
    again = new_cache(tmp_path)  # loaded with its mtime of long ago
    again.touch(key)
    assert os.stat(index).st_mtime > 1
    os.utime(index, (1, 1))
    again.touch(key)  # touched just now
    assert os.stat(index).st_mtime == 1
    again.close()


def test_a_file_of_one_block_is_one_file_its_journal_and_verdict_behind_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = new_cache(tmp_path)
    small = DATA[:549]
    good, wrong = key_of(small, name="good"), key_of(small, name="wrong", adler=zlib.adler32(small) ^ 1)
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy_open(path: str, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        opened.append((path, flags))
        return fd

    monkeypatch.setattr(os, "open", spy_open)
    put(cache, good, small, 0, 1)
    assert cache.read(good, 0, 0, 549) == small
    # one file created (by the writer); the commit opens it once more, and the read uses that fd
    assert [path for path, flags in opened] == [cache.data_path(good)] * 2
    assert [bool(flags & os.O_CREAT) for _, flags in opened] == [True, False]
    monkeypatch.undo()
    put(cache, wrong, small, 0, 1)
    prefix = os.path.dirname(cache.data_path(good))
    assert sorted(os.listdir(prefix)) == [f"{good.digest}.data"]
    for key, verdict in ((good, True), (wrong, False)):
        raw = Path(cache.data_path(key)).read_bytes()
        assert raw[:549] == small
        length = journal_length(raw[-TAIL_SIZE:])
        assert length is not None and 549 + length + TAIL_SIZE == len(raw)
        records = list(read_records(raw[549 : 549 + length]))
        assert [kind for kind, _, _ in records] == [RecordType.FILE, RecordType.BLOCK, RecordType.VERIFIED]
        assert parse_verified_record(records[-1][1]) is verdict
    journal = Path(cache.data_path(good)).read_bytes()
    assert cache.verify(good) is VerifyResult.VERIFIED and cache.is_verified(good)
    assert Path(cache.data_path(good)).read_bytes() == journal  # the verdict was already there
    assert cache.verify(wrong) is VerifyResult.MISMATCH
    assert not os.path.exists(cache.data_path(wrong))
    cache.close()
    again = new_cache(tmp_path)
    assert again.is_verified(good) and again.read(good, 0, 0, 549) == small
    assert again.cached_bytes(wrong) == 0
    again.close()


@pytest.mark.parametrize("cut", [1, TAIL_SIZE, TAIL_SIZE + 5, TAIL_SIZE + 400])
def test_a_one_block_file_without_its_whole_journal_is_dropped_at_restart(tmp_path: Path, cut: int) -> None:
    """A crash before the journal was written, or while it was: the file cannot be trusted whole."""
    cache = new_cache(tmp_path)
    small = DATA[:70_000]
    key, kept = key_of(small), key_of(small, name="kept")
    put(cache, key, small, 0, 1)
    put(cache, kept, small, 0, 1)
    cache.close()
    os.truncate(cache.data_path(key), os.path.getsize(cache.data_path(key)) - cut)
    again = new_cache(tmp_path)
    assert not again.has_block(key, 0) and not os.path.exists(again.data_path(key))
    assert again.read(kept, 0, 0, len(small)) == small
    again.close()


def test_a_one_block_file_fetched_again_gets_its_new_journal_and_verdict(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    small = DATA[:549]
    key = key_of(small)
    put(cache, key, small, 0, 1)
    assert cache.verify(key) is VerifyResult.VERIFIED
    size = os.path.getsize(cache.data_path(key))
    put(cache, key, small, 0, 1, seed=5)
    assert not cache.is_verified(key)
    assert cache.verify(key) is VerifyResult.VERIFIED
    assert os.path.getsize(cache.data_path(key)) == size
    assert cache.statistics().used_bytes == 549
    cache.close()
    again = new_cache(tmp_path)
    assert again.is_verified(key) and again.read(key, 0, 0, 549) == small
    again.close()


def test_whole_file_verification(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 5)
    assert cache.verify(key) is VerifyResult.INCOMPLETE
    put(cache, key, DATA, 5, 6)
    assert cache.verify(key) is VerifyResult.VERIFIED
    assert cache.is_verified(key)
    cache.close()
    again = new_cache(tmp_path)  # the verdict survives a restart ...
    assert again.is_verified(key)
    assert again.shrink(0.1) > 0  # ... until a block goes
    assert not again.is_verified(key)
    again.close()
    third = new_cache(tmp_path)
    assert not third.is_verified(key)
    put(third, key, DATA, 0, 6)
    assert third.verify(key) is VerifyResult.VERIFIED
    third.close()


def test_mismatch_drops_every_block_of_the_file(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    wrong = key_of(DATA, adler=zlib.adler32(DATA) ^ 1)
    put(cache, wrong, DATA, 0, 6)
    assert cache.verify(wrong) is VerifyResult.MISMATCH
    assert cache.cached_bytes(wrong) == 0
    assert cache.statistics().used_bytes == 0
    assert not os.path.exists(cache.data_path(wrong)) and not os.path.exists(cache.index_path(wrong))
    assert cache.statistics().checksum_mismatches == 1
    md5_key = FileKey(DID("scope", "m"), len(DATA), "md5:00")
    put(cache, md5_key, DATA, 0, 6)
    assert cache.verify(md5_key) is VerifyResult.UNVERIFIABLE
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


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.usefixtures("local_disk")
def test_disk_failure_hands_blocks_over_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  direct: bool) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    real_pwrite = os.pwrite
    calls = 0

    def failing_pwrite(fd: int, data: bytes, offset: int) -> int:
        nonlocal calls
        calls += 1
        # somewhere inside block 1: a buffered writer writes each chunk, a direct one each block
        if calls > (1 if direct else 7):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    if not direct:
        monkeypatch.setattr(writer_module, "DIRECT_MIN", 1 << 62)
    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    monkeypatch.setattr(os, "pwritev", _vectored(failing_pwrite))
    landed = put(cache, key, DATA, 0, 4)
    monkeypatch.undo()
    assert [b.index for b in landed] == [0, 1, 2, 3]
    in_memory = [b for b in landed if b.data is not None]
    assert in_memory and all(b.errno == errno.ENOSPC for b in in_memory)
    for block in in_memory:
        assert block.data == DATA[block.index * BS : (block.index + 1) * BS]
    assert allocated(cache.data_path(key)) <= (4 - len(in_memory)) * BS + PAGE_SIZE
    cache.close()


def _vectored(pwrite: Callable[[int, bytes, int], int]) -> Callable[[int, list[memoryview], int], int]:
    """A ``pwritev`` made of the ``pwrite`` of each buffer (a fault injected into one hits both)."""
    def pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        total = 0
        for buffer in buffers:
            written = pwrite(fd, buffer, offset + total)  # type: ignore[arg-type]
            total += written
            if written < len(buffer):
                break
        return total

    return pwritev


@pytest.fixture
def local_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache directory counts as a local disk's filesystem, wherever the tests run."""
    monkeypatch.setattr(store_module, "filesystem_type", lambda path: "ext4")


class _OpenSpy:
    """Records the flags of every ``os.open`` and which fds were opened ``O_DIRECT``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse_direct: bool = False) -> None:
        self.direct_fds: set[int] = set()
        self.direct_writes: list[tuple[int, int]] = []  # (offset, length) of each O_DIRECT write
        real_open, real_pwrite, real_pwritev = os.open, os.pwrite, os.pwritev

        def spy_open(path: str, flags: int, mode: int = 0o777, **kwargs: object) -> int:
            if flags & os.O_DIRECT and refuse_direct:
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags, mode, **kwargs)  # type: ignore[arg-type]
            if flags & os.O_DIRECT:
                self.direct_fds.add(fd)
            return fd

        def spy_pwrite(fd: int, data: bytes, offset: int) -> int:
            if fd in self.direct_fds:
                self.direct_writes.append((offset, len(data)))
            return real_pwrite(fd, data, offset)

        def spy_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
            if fd in self.direct_fds:
                self.direct_writes.append((offset, sum(map(len, buffers))))
            return real_pwritev(fd, buffers, offset)

        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(os, "pwrite", spy_pwrite)
        monkeypatch.setattr(os, "pwritev", spy_pwritev)

    def direct_spans(self) -> list[tuple[int, int]]:
        """The (start, end) of the stretches the O_DIRECT writes covered, in the order written."""
        spans: list[tuple[int, int]] = []
        for offset, length in self.direct_writes:
            assert offset % 4096 == 0 and length % 4096 == 0
            if spans and spans[-1][1] == offset:
                spans[-1] = (spans[-1][0], offset + length)
            else:
                spans.append((offset, offset + length))
        return spans


def _spied_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[BlockCache, FileKey, _OpenSpy]:
    return new_cache(tmp_path), key_of(DATA), _OpenSpy(monkeypatch)


@pytest.mark.usefixtures("local_disk")
def test_a_long_transfer_writes_whole_pages_past_the_page_cache_and_hands_its_blocks_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, key, spy = _spied_cache(tmp_path, monkeypatch)
    arrived: list[ArrivedBlock] = []
    landed = put(cache, key, DATA, 0, 6, arrived=arrived)
    monkeypatch.undo()
    assert [bytes(b.resident[:]) for b in arrived] == [DATA[i * BS : (i + 1) * BS] for i in range(6)]
    assert [b.index for b in arrived] == [b.index for b in landed] == list(range(6))
    assert all(b.data is None for b in landed)
    # every whole page went O_DIRECT, aligned, in order; only the last block's unaligned tail did not
    assert spy.direct_spans() == [(0, 5 * BS + 4321 // 4096 * 4096)]
    with open(cache.data_path(key), "rb") as data_file:
        assert data_file.read() == DATA  # exactly the file: the tail written buffered, nothing padded
    for block in arrived:
        assert cache.read(key, block.index, 0, len(block.resident)) == block.resident[:]
        block.resident.release()
        with pytest.raises(ValueError, match="released"):
            block.resident[0:1]
    cache.close()


@pytest.mark.usefixtures("local_disk")
def test_the_next_block_is_received_while_the_disk_writes_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, key, spy = _spied_cache(tmp_path, monkeypatch)
    disk_may_go = threading.Event()
    spied, spied_v = os.pwrite, os.pwritev

    def slow_disk(fd: int, data: bytes, offset: int) -> int:
        if fd in spy.direct_fds:
            assert disk_may_go.wait(10)
        return spied(fd, data, offset)

    def slow_disk_v(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fd in spy.direct_fds:
            assert disk_may_go.wait(10)
        return spied_v(fd, buffers, offset)

    monkeypatch.setattr(os, "pwrite", slow_disk)
    monkeypatch.setattr(os, "pwritev", slow_disk_v)
    landed: list[LandedBlock] = []
    arrived: list[ArrivedBlock] = []
    writer = cache.writer(key, 0, 3, landed.append, arrived.append)
    writer.write(0, DATA[: 3 * BS])  # three blocks finished while the disk has not written the first
    # each was handed over for its readers as it arrived; none is stored yet, none may be committed
    assert [(b.index, bytes(b.resident[:])) for b in arrived] == [(i, DATA[i * BS : (i + 1) * BS]) for i in range(3)]
    assert landed == []
    writer.close()  # returns at once: the transport's thread does not wait for the disk ...
    assert not writer.drained.done() and landed == []
    disk_may_go.set()
    writer.drained.result(timeout=10)  # ... which hands every block over stored, then says it is done
    monkeypatch.undo()
    assert [b.index for b in landed] == [0, 1, 2]
    # the blocks that queued while the disk was busy went in one write
    assert spy.direct_spans() == [(0, 3 * BS)] and len(spy.direct_writes) < 3
    for block in landed:
        assert cache.commit(key, block)
        assert cache.read(key, block.index, 0, BS) == DATA[block.index * BS : (block.index + 1) * BS]
    for early in arrived:  # the readers' share outlives the write's: still their block's bytes
        assert early.resident[:] == DATA[early.index * BS : (early.index + 1) * BS]
        early.resident.release()
    cache.close()


@pytest.mark.usefixtures("local_disk")
def test_a_short_transfer_is_written_through_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = new_cache(tmp_path)
    small = DATA[: writer_module.DIRECT_MIN - 1]
    key = key_of(small)
    spy = _OpenSpy(monkeypatch)
    arrived: list[ArrivedBlock] = []
    landed = put(cache, key, small, 0, 1, arrived=arrived)
    monkeypatch.undo()
    assert [b.data for b in landed] == [None] and arrived == []
    assert not spy.direct_fds
    assert cache.read(key, 0, 0, len(small)) == small
    cache.close()


@pytest.mark.parametrize("refusal", ["open", "write"])
@pytest.mark.usefixtures("local_disk")
def test_a_filesystem_refusing_direct_io_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    spy = _OpenSpy(monkeypatch, refuse_direct=refusal == "open")
    if refusal == "write":
        spied = os.pwrite

        def refusing_pwrite(fd: int, data: bytes, offset: int) -> int:
            if fd in spy.direct_fds:
                raise OSError(errno.EINVAL, "Invalid argument")
            return spied(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", refusing_pwrite)
        monkeypatch.setattr(os, "pwritev", _vectored(refusing_pwrite))
    landed = put(cache, key, DATA, 0, 6)
    monkeypatch.undo()
    assert [b.index for b in landed] == list(range(6))
    assert all(b.data is None for b in landed)  # stored, to be read from the file
    for index in range(6):
        length = min(BS, len(DATA) - index * BS)
        assert cache.read(key, index, 0, length) == DATA[index * BS : index * BS + length]
    cache.close()


@pytest.mark.parametrize("fs_type", ["nfs4", "fuse.cephfs", "lustre", None])
def test_a_cache_not_on_a_local_disk_never_writes_past_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fs_type: str | None
) -> None:
    monkeypatch.setattr(store_module, "filesystem_type", lambda path: fs_type)
    cache, key, spy = _spied_cache(tmp_path, monkeypatch)
    arrived: list[ArrivedBlock] = []
    landed = put(cache, key, DATA, 0, 6, arrived=arrived)
    monkeypatch.undo()
    assert not spy.direct_fds
    assert all(b.data is None for b in landed) and arrived == []
    cache.close()


def test_the_filesystem_of_a_path_is_that_of_its_deepest_mount_point(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "27 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "40 27 0:40 / /scratch rw shared:2 - nfs4 server:/export rw\n"
        "41 40 0:41 / /scratch/local\\040disk rw - xfs /dev/vdb rw\n"
        "garbage line\n"
    )
    def fs_of(path: str) -> str | None:
        return filesystem_type(path, str(mountinfo))

    assert fs_of("/scratch/cache") == "nfs4"
    assert fs_of("/scratch") == "nfs4"
    assert fs_of("/scratch/local disk/cache") == "xfs"
    assert fs_of("/scratchy/cache") == "ext4"  # a prefix of a name is not a parent directory
    assert fs_of("/var/tmp") == "ext4"
    assert filesystem_type("/var/tmp", str(tmp_path / "missing")) is None


def test_a_block_the_journal_refuses_can_be_salvaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 1)
    landed = write(cache, key, DATA, 1, 2)

    def no_space(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    assert not cache.commit(key, landed[0])
    monkeypatch.undo()
    assert cache.salvage(key, landed[0]) == DATA[BS : 2 * BS]
    assert not cache.has_block(key, 1)
    cache.close()


async def test_blocks_of_a_cleared_cache_are_refused(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 1)
    landed = write(cache, key, DATA, 1, 3)
    await cache.clear()
    assert cache.read(key, 0, 0, 10) is None
    assert cache.statistics().used_bytes == 0
    assert os.listdir(tmp_path / "v3") == []
    assert not cache.commit(key, landed[0])  # its data file went with the old cache
    assert cache.salvage(key, landed[0]) is None
    put(cache, key, DATA, 0, 1)  # and the cache still works afterwards
    assert cache.read(key, 0, 0, 10) == DATA[:10]
    cache.close()


def test_shrink_frees_a_fraction(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    key = key_of(DATA)
    put(cache, key, DATA, 0, 6)
    freed = cache.shrink(0.3)
    assert freed >= 0.3 * len(DATA)
    assert not cache.has_block(key, 0) and cache.has_block(key, 5)
    cache.close()


@pytest.mark.parametrize("size", [0, 1000, 3 * BS // 2, 64 * BS])
def test_block_size_must_be_whole_mebibytes_up_to_32(tmp_path: Path, size: int) -> None:
    with pytest.raises(ConfigError, match="block_size"):
        BlockCache(tmp_path, capacity=1 << 30, block_size=size)


def _small_files(cache: BlockCache, count: int) -> list[tuple[FileKey, bytes]]:
    files = []
    for i in range(count):
        data = random.Random(i).randbytes(549 + i)
        key = key_of(data, name=f"small-{i}")
        put(cache, key, data, 0, 1)
        files.append((key, data))
    return files


async def test_page_in_opens_cached_files_ahead_so_their_reads_open_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = new_cache(tmp_path)
    small = _small_files(cache, 3)
    partial = key_of(DATA, name="partial")
    put(cache, partial, DATA, 0, 2)  # 2 of its 6 blocks: not whole, not paged in
    cache.close()
    cache = new_cache(tmp_path)  # a restarted daemon: no fd kept
    advised: list[tuple[int, int]] = []
    real_fadvise = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((length, advice))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    absent = key_of(b"never cached", name="absent")
    assert await cache.page_in([key for key, _ in small] + [partial, absent]) == 3
    assert advised == [(len(data), os.POSIX_FADV_WILLNEED) for _, data in small]
    assert await cache.page_in([key for key, _ in small]) == 0  # kept already: nothing opened twice
    opened: list[str] = []
    real_open = os.open

    def spy_open(path: str, flags: int, mode: int = 0o777) -> int:
        opened.append(path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", spy_open)
    for key, data in small:
        assert cache.read(key, 0, 0, len(data)) == data
    assert opened == []
    cache.close()


async def test_page_in_closes_what_it_opened_for_files_dropped_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = new_cache(tmp_path)
    small = _small_files(cache, 3)
    cache.close()
    cache = new_cache(tmp_path)
    real_open_ahead = store_module._open_ahead

    def open_then_evict(paths: list[tuple[str, int]]) -> list[tuple[int, int]]:
        opened = real_open_ahead(paths)
        trio.from_thread.run_sync(cache.shrink, 1.0)  # every block evicted while the thread ran
        return opened

    monkeypatch.setattr(store_module, "_open_ahead", open_then_evict)
    fds_before = len(os.listdir("/proc/self/fd"))
    assert await cache.page_in([key for key, _ in small]) == 0
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert all(cache.read(key, 0, 0, 10) is None for key, _ in small)
    cache.close()


def test_a_block_evicted_while_its_rewrite_waits_for_its_commit_is_refused_not_cached_as_zeros(
    tmp_path: Path,
) -> None:
    """A transfer rewrites blocks 0 and 1 of a cached file; committing block 0 evicts the old copy of
    block 1 (least recently used), and the hole punched for it takes the rewritten bytes that wait for
    their commit. The commit of block 1 must see that, not cache a block of zeros (found by the cache's
    state machine: the block then read as corrupt)."""
    cache = new_cache(tmp_path, capacity=4 * BS)  # evicts from 0.95 × 4 MiB down to 0.9 ×
    first = DATA[: BS + 7]
    key = key_of(first, "first")
    other = random.Random(4).randbytes(3 * BS)
    put(cache, key, first, 0, 2)
    put(cache, key_of(other, "other"), other, 0, 3)  # the first file's block 0 is evicted
    assert cache.has_block(key, 1) and not cache.has_block(key, 0)
    landed = write(cache, key, first, 0, 2)
    assert cache.commit(key, landed[0])  # evicts the old copy of block 1, the least recently used
    assert not cache.has_block(key, 1)
    assert not cache.commit(key, landed[1])
    assert not cache.has_block(key, 1)
    assert cache.statistics().corrupt_blocks == 0
    assert cache.read(key, 0, 0, BS) == first[:BS]


def test_the_buffer_pool_reuses_the_buffer_given_back_last_and_keeps_what_a_read_held() -> None:
    """Blocks held in memory at once (a window's worth) go back to the pool and are all reused, no
    fresh mapping; the one given back last (its lines perhaps still in the CPU's cache) comes first.
    Buffers deep in the pool, whose pages were offered to the kernel, still take and hold bytes."""
    pool = writer_module._Buffers(keep=64, hot=4)
    held = [pool.take(BS) for _ in range(40)]
    for buffer in held:
        pool.give(buffer)
    assert pool.take(BS) is held[-1]
    again = [pool.take(BS) for _ in range(39)]
    assert pool.mapped == 40
    for buffer in again:
        buffer[:5] = b"bytes"
        assert buffer[:5] == b"bytes"
