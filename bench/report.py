"""Result types of the suites and how they are written: markdown + JSON per suite, a run summary, a chart.

Files go to ``bench/results/<YYYY-MM-DD>/`` (UTC date): ``<suite>.md``/``.json`` from each suite,
``summary.md``/``summary.json``/``summary.png`` from ``python -m bench``. Only summaries are written;
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
    """A goal of an issue: ``measured`` must be ``<=`` or ``>=`` ``limit``."""

    name: str
    measured: float | None
    limit: float
    comparison: Literal["<=", ">="]
    detail: str = ""

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


@dataclass(frozen=True)
class Reference:
    """Rows of ``workload`` in ``state`` are compared with ``tool``'s row in ``tool_state``.

    ``state`` "*" stands for every state of the workload. The reference row is of the same workload, or of
    ``tool_workload`` when the reference does the work under another name (``list_files`` for ``ls -l``).
    The reference is what the same work costs without datalakefs in the same run (curl, the local disk, the
    raw catalogue call), so a ratio survives the machine's speed of the day where a figure does not.
    """

    workload: str
    tool: str
    tool_state: str
    state: str = "*"
    tool_workload: str = ""


@dataclass(frozen=True)
class Ratio:
    """A row's time relative to its reference's for the same work: < 1 is faster than the reference."""

    workload: str
    tool: str
    state: str
    reference: str
    value: float

    @property
    def label(self) -> str:
        return f"{self.workload} · {self.tool} ({self.state}) vs {self.reference}"


@dataclass
class SuiteResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "context": self.context,
            "rows": [asdict(r) for r in self.rows],
            "goals": [{**asdict(g), "met": g.met, "attainment": g.attainment} for g in self.goals],
            "ratios": [{**asdict(r), "label": r.label} for r in ratios(self)],
            "notes": self.notes,
            "error": self.error,
        }


def _time_ratio(row: Row, reference: Row) -> float | None:
    """``row``'s time over ``reference``'s; from the rates when a row has no time (same bytes, inverse ratio)."""
    if row.seconds and reference.seconds:
        return row.seconds / reference.seconds
    if row.mb_s and reference.mb_s:
        return reference.mb_s / row.mb_s
    return None


def ratios(result: SuiteResult) -> list[Ratio]:
    """Every row that has a reference in ``result``, as its time relative to that reference, in row order."""
    found: list[Ratio] = []
    for row in result.rows:
        for ref in result.references:
            if ref.workload != row.workload or ref.state not in ("*", row.state) or ref.tool == row.tool:
                continue
            base_workload = ref.tool_workload or ref.workload
            base = next((r for r in result.rows
                         if (r.workload, r.tool, r.state) == (base_workload, ref.tool, ref.tool_state)), None)
            value = None if base is None else _time_ratio(row, base)
            if value is not None:
                found.append(Ratio(row.workload, row.tool, row.state, f"{ref.tool} ({ref.tool_state})", value))
            break
    return found


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
    found = ratios(result)
    if found:
        lines += ["| workload | tool (state) | time ÷ reference's | reference, same run |", "|---|---|---|---|"]
        lines += [f"| {r.workload} | {r.tool} ({r.state}) | {_fmt(r.value)} | {r.reference} |" for r in found]
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


def write_chart(results: list[SuiteResult], path: Path) -> Path | None:
    """Every workload's time as a ratio to its reference in the same run (log scale), then goal attainment.

    The title carries the date and the commit, so a chart found on its own still says what it measured.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart", flush=True)
        return None
    ratio_bars = [(f"{r.name}: {ratio.label}", ratio.value, ratio.tool.startswith("datalakefs"))
                  for r in results for ratio in ratios(r)]
    goal_bars = [(f"{r.name}: {g.name}", g.attainment, bool(g.met))
                 for r in results for g in r.goals if g.attainment]
    panels = [(bars, xlabel) for bars, xlabel in (
        (ratio_bars, "time ÷ the reference's time in the same run (log scale; < 1: faster than the reference)"),
        (goal_bars, "goal attainment (log scale; ≥ 1: met)"),
    ) if bars]
    if not panels:
        return None
    ctx = context()
    longest = max(len(label) for bars, _ in panels for label, _, _ in bars)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(
        6 + 0.07 * longest, 1.5 + 0.28 * sum(len(bars) for bars, _ in panels) + 1.2 * len(panels)))
    for ax, (bars, xlabel) in zip(axes[:, 0], panels, strict=True):
        values = [value for _, value, _ in bars]
        if bars is ratio_bars:
            colors = ["tab:blue" if ours else "tab:gray" for _, _, ours in bars]
        else:
            colors = ["tab:green" if met else "tab:red" for _, _, met in bars]
        # bars start at 1 (the reference, or a goal just met) so that a bar's side says better or worse
        ax.barh(range(len(bars)), [value - 1 for value in values], left=1, color=colors)
        ax.set_yticks(range(len(bars)), [label for label, _, _ in bars], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        reach = max(max(values), 1 / min(values)) * 1.5
        ax.set_xlim(1 / reach, reach)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xlabel(xlabel)
        for y, value in enumerate(values):
            ax.annotate(f"{value:.3g}", (value, y), xytext=(3 if value >= 1 else -3, 0), textcoords="offset points",
                        va="center", ha="left" if value >= 1 else "right", fontsize=7)
    fig.suptitle(f"datalakefs benchmarks · {ctx['utc']} · commit {ctx['commit']} · load average {ctx['load_avg']}")
    fig.tight_layout()
    # bbox "tight" grows the canvas to the longest label instead of cutting it off
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
