"""The read bench's random-read figures: the first read apart, datalakefs against the FUSE floor, and how
bench/readcost.py reads strace's summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.read import RandomRun, random_detail, read_random
from bench.readcost import strace_counts


def test_a_run_counts_the_reads_after_the_first_per_read() -> None:
    run = RandomRun(seconds=0.9, first=0.1, reads=2001)
    assert run.us_per_read == pytest.approx(400.0)
    assert run.values() == {"seconds": 0.9, "first_read_ms": pytest.approx(100.0), "us_per_read": run.us_per_read}


def test_read_random_reads_every_offset_and_times_the_first_read_within_the_whole(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    run = read_random(path, [8192, 0, 4096, 12288])
    assert run.reads == 4
    assert 0 < run.first <= run.seconds


def test_a_short_read_is_an_error_not_a_figure(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x" * 5000)
    with pytest.raises(Exception, match="short read at 4096"):
        read_random(path, [0, 4096])


def test_the_detail_puts_datalakefs_against_the_passthrough_and_the_floor_of_passthrough_plus_raw_gets() -> None:
    detail = random_detail(0.8, 0.5, 0.3, 0.55, 95.0)
    assert detail == ("0.800 vs 0.500 s; first read (open, replicas from the catalogue) 95.0 ms; "
                      "2.67× the pyfuse3 passthrough's 0.300 s; 1.00× the floor, passthrough + raw GETs = 0.800 s; "
                      "1.45× xrootdfs's 0.550 s")


def test_the_detail_leaves_out_what_the_run_did_not_measure() -> None:
    assert random_detail(0.8, 0.5, None, None, None) == "0.800 vs 0.500 s"


def test_strace_summary_rows_are_read_as_calls_per_syscall_with_or_without_errors(tmp_path: Path) -> None:
    summary = tmp_path / "strace"
    summary.write_text(
        "% time     seconds  usecs/call     calls    errors syscall\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        " 48.48    0.006460          12       498           writev\n"
        "  4.27    0.003782           5       711       187 recvfrom\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        "100.00    0.026159           8      1209       187 total\n")
    assert strace_counts(summary) == {"writev": 498, "recvfrom": 711}
