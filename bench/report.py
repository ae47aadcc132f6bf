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


def write_chart(results: list[SuiteResult], path: Path) -> Path | None:
    """Goal attainment of every goal (1 = just met) and the MB/s of every throughput row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart", flush=True)
        return None
    goals = [(f"{r.name}: {g.name}", g.attainment) for r in results for g in r.goals if g.attainment is not None]
    rates = [(f"{r.name}: {row.workload}, {row.tool} ({row.state})", row.mb_s)
             for r in results for row in r.rows if row.mb_s]
    panels = [p for p in (goals, rates) if p]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.32 * sum(len(p) for p in panels) + 2.5 * len(panels)),
                             squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        labels = [label for label, _ in panel]
        values = [min(float(value), 10.0) if panel is goals else float(value) for _, value in panel]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in values] if panel is goals else "tab:blue"
        ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        if panel is goals:
            ax.axvline(1.0, color="black", linewidth=1)
            ax.set_xlabel("goal attainment (≥ 1: met; capped at 10)")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("MB/s (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
