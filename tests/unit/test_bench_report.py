"""The bench's summary chart: what it plots (ratios to the same run's reference), its title, unclipped labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.report import ChartPoint, Goal, SuiteResult, chart_data, chart_title, draw_chart, write_chart

CONTEXT = {"utc": "2026-12-05T06:40:00Z", "commit": "abc1234"}


def suite() -> SuiteResult:
    return SuiteResult("dataset", context=dict(CONTEXT), goals=[
        Goal("cold ≤ 3× curl -K", 2.0, 3.0, "<=", reference="curl -K (one connection)"),
        Goal("cold ≥ 2× the best peer", 1.5, 2.0, ">=", reference="best peer"),
        Goal("catalogue calls for ls -l + every file, cold", 10, 5, "<="),
        Goal("not measured this run", None, 1.0, "<=", reference="curl"),
    ])


def test_goals_with_a_reference_are_plotted_as_the_ratio_itself_with_their_limit() -> None:
    data = chart_data([suite()])
    assert data.ratios == [
        ChartPoint("dataset: cold ≤ 3× curl -K (vs curl -K (one connection))", 2.0, 3.0, True),
        ChartPoint("dataset: cold ≥ 2× the best peer (vs best peer)", 1.5, 2.0, False),
    ]


def test_absolute_goals_are_plotted_against_their_limit_and_unmeasured_goals_are_left_out() -> None:
    data = chart_data([suite()])
    assert data.absolutes == [ChartPoint("dataset: catalogue calls for ls -l + every file, cold", 2.0, 1.0, False)]


def test_the_title_has_the_date_and_the_commit_of_the_run() -> None:
    title = chart_title([SuiteResult("failed"), suite()])
    assert title == "datalakefs bench · 2026-12-05 06:40:00 UTC · commit abc1234"


def test_long_labels_and_the_title_fit_inside_the_figure() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = suite()
    long.goals.append(Goal("a goal whose name is very long " * 4, 0.5, 1.0, "<=", reference="a long reference " * 3))
    fig = draw_chart(chart_data([long]))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        width = fig.bbox.width
        texts = [fig._suptitle] + [label for ax in fig.axes for label in ax.get_yticklabels()]
        assert len(texts) == 1 + 4
        for text in texts:
            extent = text.get_window_extent(renderer)
            assert extent.x0 >= 0 and extent.x1 <= width, text.get_text()
    finally:
        plt.close(fig)


def test_write_chart_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = write_chart([suite()], tmp_path / "summary.png")
    assert path is not None and path.read_bytes().startswith(b"\x89PNG")
