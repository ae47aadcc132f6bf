"""The bench's report: each workload as a ratio to its reference in the same run, and the chart that shows it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bench.report import Goal, Reference, Row, SuiteResult, markdown, ratios, write_chart


def _suite() -> SuiteResult:
    return SuiteResult(
        "dataset",
        rows=[
            Row("every file", "curl -K", "cold", 2.0),
            Row("every file", "local cat", "cold", 1.0),
            Row("every file", "datalakefs", "cold", 5.0),
            Row("every file", "datalakefs", "warm", 1.5),
            Row("every file", "rclone", "cold", 40.0),
            Row("seq 1 GiB", "curl", "cold", None, mb_s=1000.0),
            Row("seq 1 GiB", "datalakefs", "cold", None, mb_s=500.0),
            Row("ls -l 10k", "datalakefs", "cold", 0.3),
            Row("list 10k", "list_files", "-", 0.2),
            Row("no reference here", "datalakefs", "cold", 1.0),
        ],
        references=[
            Reference("every file", "local cat", "cold", state="warm"),
            Reference("every file", "curl -K", "cold"),
            Reference("seq 1 GiB", "curl", "cold"),
            Reference("ls -l 10k", "list_files", "-", tool_workload="list 10k"),
        ],
        goals=[Goal("cold ≤ 3× curl -K", 2.5, 3.0, "<="), Goal("≥ 0.6× curl", 0.5, 0.6, ">=")],
    )


def test_every_row_with_a_reference_becomes_its_time_relative_to_it() -> None:
    found = {(r.workload, r.tool, r.state): (r.value, r.reference) for r in ratios(_suite())}
    assert found == {
        ("every file", "datalakefs", "cold"): (2.5, "curl -K (cold)"),
        ("every file", "datalakefs", "warm"): (1.5, "local cat (cold)"),  # the specific state wins over "*"
        ("every file", "rclone", "cold"): (20.0, "curl -K (cold)"),
        ("every file", "local cat", "cold"): (0.5, "curl -K (cold)"),
        ("seq 1 GiB", "datalakefs", "cold"): (2.0, "curl (cold)"),  # from the rates: half the rate, twice the time
        ("ls -l 10k", "datalakefs", "cold"): (pytest.approx(1.5), "list_files (-)"),
    }


def test_a_missing_reference_row_gives_no_ratio_rather_than_a_wrong_one() -> None:
    suite = SuiteResult("read", rows=[Row("seq", "datalakefs", "cold", 3.0)],
                        references=[Reference("seq", "curl", "cold")])
    assert ratios(suite) == []


def test_the_ratios_are_in_the_markdown_and_the_json() -> None:
    suite = _suite()
    text = markdown(suite)
    assert "| every file | datalakefs (warm) | 1.5 | local cat (cold) |" in text
    written = json.loads(json.dumps(suite.to_json()))
    assert {r["label"] for r in written["ratios"]} >= {"every file · rclone (cold) vs curl -K (cold)"}


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_the_chart_grows_with_its_labels_instead_of_cutting_them(tmp_path: Path) -> None:
    short = write_chart([_suite()], tmp_path / "short.png")
    long_suite = _suite()
    long_suite.rows.append(Row("every file", "a peer with a very long name " * 6, "cold", 3.0))
    long = write_chart([long_suite], tmp_path / "long.png")
    assert short is not None and long is not None
    (short_width, short_height), (long_width, long_height) = _png_size(short), _png_size(long)
    assert long_width > short_width + 200  # the canvas took the longer label in
    assert long_height > short_height  # one more bar


def test_no_ratio_and_no_goal_draws_no_chart(tmp_path: Path) -> None:
    assert write_chart([SuiteResult("empty", rows=[Row("w", "t", "s", 1.0)])], tmp_path / "none.png") is None
