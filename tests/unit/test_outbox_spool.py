"""Spool files: fsx-style random writes and truncates against an in-memory model; checksums; ENOSPC;
the page cache released behind writers and readers."""

from __future__ import annotations

import os
import random
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datalakefs.errors import SpoolFullError
from datalakefs.outbox import spool as spool_module
from datalakefs.outbox.spool import GrowingSpool, SpoolFile, StreamAbandonedError, file_adler32


def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 3 << 20), st.integers(0, 300_000)),
        st.tuples(st.just("append"), st.just(0), st.integers(0, 1 << 20)),
        st.tuples(st.just("truncate"), st.integers(0, 3 << 20), st.just(0)),
        st.tuples(st.just("read"), st.integers(0, 3 << 20), st.integers(0, 1 << 20)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(operations=OPERATIONS, seed=st.integers(0, 2**32))
def test_random_operations_match_a_model(tmp_path_factory: pytest.TempPathFactory,
                                         operations: list[tuple[str, int, int]], seed: int) -> None:
    rng = random.Random(seed)
    spool = SpoolFile.create(tmp_path_factory.mktemp("spool"), "journal", reserve=0)
    model = bytearray()
    # steps far below the sizes written: pages are released all the time, and no byte may change
    with mock.patch.multiple(spool_module, WRITEBACK_STEP=64 << 10, DROP_LAG=128 << 10):
        _apply(spool, model, operations, rng)
    spool.close()
    assert spool.path.read_bytes() == bytes(model)
    assert file_adler32(spool.path) == (len(model), _adler(bytes(model)))


def _apply(spool: SpoolFile, model: bytearray, operations: list[tuple[str, int, int]], rng: random.Random) -> None:
    for kind, offset, size in operations:
        if kind in ("write", "append"):
            start = len(model) if kind == "append" else offset
            data = rng.randbytes(size)
            assert spool.write(start, data) == size
            if size:  # an empty write does not extend a file
                model.extend(b"\0" * max(0, start + size - len(model)))
                model[start : start + size] = data
        elif kind == "truncate":
            spool.truncate(offset)
            del model[offset:]
            model.extend(b"\0" * (offset - len(model)))
        elif kind == "read":
            assert spool.read(offset, size) == bytes(model[offset : offset + size])
        else:
            spool.sync()
            spool.close()
        assert spool.size == len(model)
        if spool.adler32 is not None:  # when known, the running checksum is right
            assert spool.adler32 == _adler(bytes(model))


def test_sequential_writes_keep_a_running_checksum(tmp_path: Path) -> None:
    spool = SpoolFile.create(tmp_path, "journal", reserve=0)
    data = random.Random(1).randbytes(3_000_001)
    for start in range(0, len(data), 131072):
        spool.write(start, data[start : start + 131072])
    assert spool.adler32 == _adler(data)
    spool.write(10, b"x")  # an overwrite: the running checksum no longer covers the file
    assert spool.adler32 is None
    spool.truncate(0)
    spool.write(0, b"abc")
    assert spool.adler32 == _adler(b"abc")
    spool.delete()
    assert not spool.path.exists()


def test_below_the_reserve_a_write_is_refused_before_any_byte_lands(tmp_path: Path) -> None:
    spool = SpoolFile.create(tmp_path, "journal", reserve=1 << 62)
    with pytest.raises(SpoolFullError) as raised:
        spool.write(0, b"data")
    assert raised.value.errno == 28
    assert spool.size == 0 and spool.path.stat().st_size == 0
    spool.delete()


def _consume(growing: GrowingSpool, into: list[bytes | Exception]) -> threading.Thread:
    def run() -> None:
        try:
            into.append(b"".join(growing))
        except StreamAbandonedError as exc:
            into.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@given(pieces=st.lists(st.tuples(st.binary(min_size=0, max_size=300_000), st.booleans()), max_size=12))
@settings(max_examples=25, deadline=None)
def test_a_growing_spool_yields_every_byte_written_in_order(tmp_path_factory: pytest.TempPathFactory,
                                                             pieces: list[tuple[bytes, bool]]) -> None:
    """Bytes handed over with their write or not (as before the upload started), more of them than
    it holds (the reader then reads them from the file): the same bytes come out."""
    spool = SpoolFile.create(tmp_path_factory.mktemp("grow"), "journal", reserve=0)
    growing = GrowingSpool(spool)
    result: list[bytes | Exception] = []
    with mock.patch.object(spool_module, "HANDOFF_LIMIT", 400_000):
        reader = _consume(growing, result)
        for piece, handed_over in pieces:
            spool.write(spool.size, piece)
            growing.grown(spool.size, piece if handed_over else b"")
        growing.end(spool.size)
        reader.join(10)
    spool.close()
    assert result == [b"".join(piece for piece, _ in pieces)]


def test_a_reader_that_keeps_up_never_reads_back_what_was_handed_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[int, int]] = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, size, offset: reads.append((offset, size)) or pread(fd, size, offset))
    spool = SpoolFile.create(tmp_path, "journal", reserve=0)
    spool.write(0, b"before")  # written before the upload started: read from the file
    growing = GrowingSpool(spool)
    growing.grown(spool.size)
    chunks = iter(growing)
    assert next(chunks) == b"before"
    for piece in (b"one", b"two", b"three"):
        spool.write(spool.size, piece)
        growing.grown(spool.size, piece)
        assert next(chunks) is piece
    spool.write(spool.size, b"lost")
    growing.grown(spool.size, b"lost")
    growing.abandon()  # what it held goes with it
    with pytest.raises(StreamAbandonedError):
        next(chunks)
    growing.close()
    spool.close()
    assert reads == [(0, 6)]


def test_an_abandoned_growing_spool_stops_its_reader(tmp_path: Path) -> None:
    spool = SpoolFile.create(tmp_path, "journal", reserve=0)
    growing = GrowingSpool(spool)
    result: list[bytes | Exception] = []
    reader = _consume(growing, result)
    spool.write(0, b"abc")
    growing.grown(3)
    growing.abandon()  # e.g. a write went back into the file
    reader.join(10)
    spool.close()
    assert not reader.is_alive() and isinstance(result[0], StreamAbandonedError)


class _Advice:
    """Records ``posix_fadvise`` calls: (thread name, start, end, advice)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int]] = []

    def __call__(self, fd: int, offset: int, length: int, advice: int) -> None:
        os.fstat(fd)  # a descriptor that is still open
        self.calls.append((threading.current_thread().name, offset, offset + length, advice))

    def ranges(self, thread: str) -> list[tuple[int, int]]:
        assert all(advice == os.POSIX_FADV_DONTNEED for _, _, _, advice in self.calls)
        return [(start, end) for name, start, end, _ in self.calls if name == thread]


def test_a_writer_starts_writeback_step_by_step_and_drops_the_pages_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    advice = _Advice()
    monkeypatch.setattr(os, "posix_fadvise", advice)
    monkeypatch.setattr(spool_module, "WRITEBACK_STEP", 1000)
    monkeypatch.setattr(spool_module, "DROP_LAG", 2000)
    spool = SpoolFile.create(tmp_path, "journal", reserve=0)
    data = random.Random(2).randbytes(5_500)
    for start in range(0, len(data), 700):
        spool.write(start, data[start : start + 700])
    # each call starts the writeback of the steps completed since the last one, and covers the
    # DROP_LAG bytes before them again: written back by now, they leave the page cache
    assert advice.ranges(threading.current_thread().name) == [
        (0, 1000), (0, 2000), (0, 3000), (1000, 4000), (2000, 5000)]
    spool.truncate(2500)  # what follows a truncate is written back from there on
    spool.write(2500, data[:1000])
    assert advice.ranges(threading.current_thread().name)[-1] == (500, 3000)
    assert spool.read(0, 3500) == data[:2500] + data[:1000]
    spool.delete()


def test_a_growing_spool_releases_the_pages_it_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    advice = _Advice()
    monkeypatch.setattr(os, "posix_fadvise", advice)
    spool = SpoolFile.create(tmp_path, "journal", reserve=0)
    growing = GrowingSpool(spool)
    result: list[bytes | Exception] = []
    sent: list[int] = []
    reader = threading.Thread(target=lambda: result.append(b"".join(_noting(growing, sent))), name="reader")
    reader.start()
    for piece in (b"a" * 300, b"b" * 500, b"c" * 200):
        spool.write(spool.size, piece)
        growing.grown(spool.size)
    growing.end(spool.size)
    reader.join(10)
    spool.close()
    assert result == [b"a" * 300 + b"b" * 500 + b"c" * 200]
    released = advice.ranges("reader")
    # contiguous from the start, each up to what had been handed out (and so sent) when the next chunk
    # was asked for, and all of it at the end
    assert [start for start, _ in released] == [0] + [end for _, end in released[:-1]]
    assert [end for _, end in released] == sent and sent[-1] == 1000


def _noting(growing: GrowingSpool, sent: list[int]) -> Iterator[bytes]:
    """The chunks of ``growing``, noting in ``sent`` the bytes handed out before each next one is asked for."""
    total = 0
    for chunk in growing:
        total += len(chunk)
        yield chunk
        sent.append(total)
