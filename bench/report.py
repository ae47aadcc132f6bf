"""Result types of the suites and how they are written: markdown + JSON per suite, a run summary, a chart.

Files go to ``bench/results/<YYYY-MM-DD>/`` (UTC date): ``<suite>.md``/``.json`` from each suite,
``summary.md``/``summary.json``/``summary.png`` from ``python -m bench`` (the chart: every goal as a ratio to its
reference in the same run, see :func:`chart_data`). Only summaries are written;
raw per-run data stays in memory (``bench/results/*/raw/`` is git-ignored for anyone who wants more).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    path = RESULTS / time.strftime("%Y-%m-%d", time.gmtime())
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Row:
    """One measurement: the median of ``runs`` runs of one tool on one workload in one cache state."""

    workload: str
    tool: str
    state: str
    seconds: float | None
    mb_s: float | None = None  # 10^6 bytes per second
    runs: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class Goal:
    """A goal of an issue: ``measured`` must be ``<=`` or ``>=`` ``limit``.

    ``reference`` names what ``measured`` is a ratio to (measured in the same run), e.g. "curl -K";
    empty when the goal is an absolute figure (seconds, MB, calls).
    """

    name: str
    measured: float | None
    limit: float
    comparison: Literal["<=", ">="]
    detail: str = ""
    reference: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.limit if self.comparison == "<=" else self.measured >= self.limit

    @property
    def attainment(self) -> float | None:
        """>= 1 when met: limit/measured for upper bounds, measured/limit for lower bounds."""
        if self.measured is None:
            return None
        if self.comparison == "<=":
            return self.limit / self.measured if self.measured > 0 else float("inf")
        return self.measured / self.limit if self.limit > 0 else float("inf")


@dataclass
class SuiteResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "context": self.context,
            "rows": [asdict(r) for r in self.rows],
            "goals": [{**asdict(g), "met": g.met, "attainment": g.attainment} for g in self.goals],
            "notes": self.notes,
            "error": self.error,
        }


def failed_suite(name: str, error: str) -> SuiteResult:
    return SuiteResult(name, context=context(), error=error)


def context() -> dict[str, Any]:
    """Where and when: the load matters on this shared 2-core machine."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent, check=False).stdout.strip()
    return {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "commit": head,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _extra(extra: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in extra.items())


def markdown(result: SuiteResult) -> str:
    ctx = result.context
    lines = [f"## {result.name}", ""]
    if ctx:
        lines.append(f"{ctx.get('utc')} · commit {ctx.get('commit')} · load average {ctx.get('load_avg')} "
                     f"at start, {ctx.get('load_avg_end', '?')} at end · {ctx.get('cpus')} CPUs")
        lines.append("")
    if result.error:
        lines += ["**The suite failed:**", "", "```", result.error.strip(), "```", ""]
    if result.rows:
        lines += ["| workload | tool | state | seconds (median) | MB/s | runs | details |",
                  "|---|---|---|---|---|---|---|"]
        for r in result.rows:
            details = "; ".join(filter(None, [_extra(r.extra), r.note]))
            lines.append(f"| {r.workload} | {r.tool} | {r.state} | {_fmt(r.seconds)} | {_fmt(r.mb_s)} | "
                         f"{r.runs} | {details} |")
        lines.append("")
    if result.goals:
        lines += ["| goal | measured | limit | met | how |", "|---|---|---|---|---|"]
        for g in result.goals:
            met = {True: "yes", False: "**no**", None: "not measured"}[g.met]
            lines.append(f"| {g.name} | {_fmt(g.measured)} | {g.comparison} {_fmt(g.limit)} | {met} | "
                         f"{g.detail} |")
        lines.append("")
    lines += [f"* {note}" for note in result.notes]
    return "\n".join(lines).rstrip() + "\n"


def write_suite(result: SuiteResult) -> Path:
    """Write ``<suite>.md`` and ``.json``, print the markdown; returns the markdown's path."""
    result.context.setdefault("load_avg_end", [round(x, 2) for x in os.getloadavg()])
    out = results_dir()
    text = markdown(result)
    (out / f"{result.name}.md").write_text(text)
    (out / f"{result.name}.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    print(text, flush=True)
    return out / f"{result.name}.md"


def write_summary(results: list[SuiteResult]) -> list[Path]:
    out = results_dir()
    md = out / "summary.md"
    md.write_text("# datalakefs benchmarks\n\nCommand: `make bench` (`python -m bench`).\n\n"
                  + "\n".join(markdown(r) for r in results))
    js = out / "summary.json"
    js.write_text(json.dumps({"suites": [r.to_json() for r in results]}, indent=1) + "\n")
    paths = [md, js]
    chart = write_chart(results, out / "summary.png")
    if chart is not None:
        paths.append(chart)
    return paths


@dataclass(frozen=True)
class ChartPoint:
    """One dot of the summary chart: a goal's measured value against its limit."""

    label: str
    value: float
    limit: float
    met: bool


@dataclass(frozen=True)
class ChartData:
    title: str
    ratios: list[ChartPoint]  # × the reference measured in the same run
    absolutes: list[ChartPoint]  # measured / limit, for goals with no reference


def chart_data(results: list[SuiteResult]) -> ChartData:
    """What the summary chart shows: every measured goal, as a ratio to its reference where it has one."""
    ratios: list[ChartPoint] = []
    absolutes: list[ChartPoint] = []
    for r in results:
        for g in r.goals:
            if g.measured is None or g.met is None:
                continue
            if g.reference:
                ratios.append(ChartPoint(f"{r.name}: {g.name} (vs {g.reference})", g.measured, g.limit, g.met))
            elif g.limit > 0:
                absolutes.append(ChartPoint(f"{r.name}: {g.name}", g.measured / g.limit, 1.0, g.met))
    return ChartData(chart_title(results), ratios, absolutes)


def chart_title(results: list[SuiteResult]) -> str:
    """The run's date and commit, from the first suite that recorded them."""
    ctx = next((r.context for r in results if r.context.get("utc")), {})
    date = str(ctx.get("utc", "unknown date")).replace("T", " ").replace("Z", " UTC")
    return f"datalakefs bench · {date} · commit {ctx.get('commit') or 'unknown'}"


def write_chart(results: list[SuiteResult], path: Path) -> Path | None:
    """Draw :func:`chart_data` (see :func:`draw_chart`) into ``path``; None without matplotlib or goals."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart", flush=True)
        return None
    fig = draw_chart(chart_data(results))
    if fig is None:
        return None
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" as a second guard: labels widen the image, never clip
    plt.close(fig)
    return path


def draw_chart(data: ChartData) -> Any:
    """A log-scale dot chart: each goal's value with its limit marked (|) on its row, one panel per kind."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    panels = [(points, xlabel) for points, xlabel in (
        (data.ratios, "× the reference measured in the same run (log scale); | = goal"),
        (data.absolutes, "measured / goal limit, for goals without a reference (log scale); | = goal"),
    ) if points]
    if not panels:
        return None
    longest = max(len(p.label) for points, _ in panels for p in points)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(6 + 0.065 * longest, 1.5 + sum(0.3 * len(points) + 1 for points, _ in panels)),
                             height_ratios=[len(points) + 2 for points, _ in panels])
    for ax, (points, xlabel) in zip(axes[:, 0], panels, strict=True):
        rows = range(len(points))
        ax.scatter([p.value for p in points], rows, zorder=3,
                   color=["tab:green" if p.met else "tab:red" for p in points])
        ax.scatter([p.limit for p in points], rows, marker="|", s=300, color="black", zorder=2)
        for row, p in zip(rows, points, strict=True):
            ax.annotate(f"{p.value:.3g}×", (p.value, row), textcoords="offset points", xytext=(6, 3), fontsize=7)
        ax.set_yticks(list(rows), [p.label for p in points], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.margins(x=0.15)
        # plain numbers (0.5, 2, not 5×10^-1); minor ticks labelled only where the axis spans few decades
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", which="both", alpha=0.3)
    fig.suptitle(data.title)
    fig.tight_layout()
    return fig
