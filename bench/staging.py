"""Rule staging and the hybrid read path, measured on a running demo lake.

1. **Rule mode**: time from ``open()`` to the first byte of a file that is not staged yet, against the
   time the rule itself took (created → OK, seen by polling the rule every 50 ms from outside). The
   overhead goal is at most one poll interval of the daemon.
2. **Hybrid vs stream**: first-byte latency (``open`` + 1-byte ``read``) of a cold file in ``auto`` mode
   while a rule (slowed by the FTS shim's delay knob) still replicates it, against a cold file in
   ``stream`` mode. Goal: equal.

3. With ``--with-10k``: ``datalakefs stage <dataset_10k> --wait``, the wall time until every lock is
   OK (once per lake: a staged dataset stays staged; about half an hour on a 2-core machine).

Every run of 1. and 2. uses files made for it (only on LAKE-ORIGIN), so nothing is cached or staged
before. Run: ``python -m bench.staging --state-dir DIR [--runs N] [--with-10k]`` with the lake up
(``datalakefs demo up``).
Writes ``bench/results/<date>/staging.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from datalakefs.demo import seed
from datalakefs.demo.lake import Lake
from datalakefs.demo.status import Knobs, LakeStatus
from datalakefs.staging.rule import RuleStager

RESULTS = Path(__file__).parent / "results"


def fresh_file(lake: LakeStatus, client: Any, size: int) -> seed.FileSpec:
    assert lake.seed is not None
    scope = lake.seed.upload_scope
    name = f"bench_staging_{uuid.uuid4().hex[:10]}"
    spec = seed.FileSpec(scope, f"{name}.bin", size)
    seed.add_origin_dataset(client, Lake(lake.state_dir), seed.DatasetPlan(scope, name, (spec,)))
    return spec


class Mounted:
    def __init__(self, lake: LakeStatus, base: Path, *options: str) -> None:
        self.point = base / f"mnt_{uuid.uuid4().hex[:6]}"
        self.point.mkdir()
        opts = [f"cache_dir={base / 'cache' / self.point.name}", f"state_dir={base / 'state'}", *options]
        self.argv = ["--config", str(lake.datalakefs_config)] + [a for o in opts for a in ("-o", o)]

    def __enter__(self) -> Path:
        subprocess.run([sys.executable, "-m", "datalakefs", "mount", str(self.point), *self.argv], check=True,
                       capture_output=True)
        return self.point

    def __exit__(self, *exc: object) -> None:
        subprocess.run([sys.executable, "-m", "datalakefs", "umount", str(self.point), *self.argv],
                       check=False, capture_output=True)


def path_in(point: Path, spec: seed.FileSpec) -> Path:
    return point / spec.scope / spec.name.removesuffix(".bin") / spec.name


def first_byte(path: Path) -> float:
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 1)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def rule_ok_watch(client: Any, spec: seed.FileSpec, rse: str, found: dict[str, float]) -> threading.Thread:
    """Note when a rule on ``spec`` appears and when it turns OK (wall clock, 50 ms resolution)."""

    def watch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            rules = [r for r in client.list_associated_rules_for_file(spec.scope, spec.name)
                     if r["rse_expression"] == rse]
            now = time.time()
            if rules:
                found.setdefault("created", now)
                if rules[0]["state"] == "OK":
                    found["ok"] = now
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def bench_rule_mode(lake: LakeStatus, client: Any, base: Path, runs: int) -> list[dict[str, float]]:
    assert lake.seed is not None
    rows = []
    with Mounted(lake, base, "staging=rule", "staging_timeout=300") as point:
        for _ in range(runs):
            spec = fresh_file(lake, client, 1 << 20)
            seen: dict[str, float] = {}
            started = time.time()
            watcher = rule_ok_watch(client, spec, lake.seed.scratch_rse, seen)
            latency = first_byte(path_in(point, spec))
            watcher.join(timeout=60)
            rule_s = seen["ok"] - seen["created"]
            rows.append({"open_to_first_byte_s": latency, "rule_s": rule_s,
                         "overhead_s": started + latency - seen["ok"]})
    return rows


def bench_first_byte(lake: LakeStatus, client: Any, base: Path, runs: int) -> dict[str, list[float]]:
    assert lake.seed is not None
    control = Lake(lake.state_dir)
    knobs = control.read_knobs()
    results: dict[str, list[float]] = {"stream": [], "hybrid": []}
    try:
        control.write_knobs(Knobs(delay=10.0))
        with Mounted(lake, base, "staging=stream") as stream_point, Mounted(lake, base, "staging=auto") as auto_point:
            for _ in range(runs):
                plain = fresh_file(lake, client, 8 << 20)
                results["stream"].append(first_byte(path_in(stream_point, plain)))
                staged = fresh_file(lake, client, 8 << 20)
                client.add_replication_rule([{"scope": staged.scope, "name": staged.name}], 1,
                                            lake.seed.scratch_rse, lifetime=3600)
                results["hybrid"].append(first_byte(path_in(auto_point, staged)))
    finally:
        control.write_knobs(knobs)
    return results


def bench_prefetch_10k(lake: LakeStatus) -> dict[str, Any]:
    assert lake.seed is not None
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "datalakefs", "stage", "--config", str(lake.datalakefs_config),
                           lake.seed.dataset_10k, "--wait"], capture_output=True, text=True, check=False)
    return {"dataset": lake.seed.dataset_10k, "seconds": round(time.monotonic() - started, 1),
            "exit_status": done.returncode, "result": (done.stdout.strip().splitlines() or [""])[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=".demo", help="state dir of the running demo lake")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--with-10k", action="store_true", help="also prefetch the 10,000-file dataset")
    args = parser.parse_args()
    lake = Lake(Path(args.state_dir)).status()
    if not lake.healthy or lake.seed is None:
        print(f"the lake in {args.state_dir} is not up: datalakefs demo up --state-dir {args.state_dir}")
        return 2
    os.environ.update(lake.env)
    from rucio.client import Client

    client = Client()
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="bench-staging-") as tmp:
        rule_rows = bench_rule_mode(lake, client, Path(tmp), args.runs)
        first = bench_first_byte(lake, client, Path(tmp), args.runs)
    prefetch = bench_prefetch_10k(lake) if args.with_10k else None

    median = statistics.median
    poll = RuleStager.__init__.__kwdefaults__ or {}
    summary = {
        "runs": args.runs,
        "poll_min_s": poll.get("poll_min"),
        "poll_max_s": poll.get("poll_max"),
        "rule_mode": {
            "open_to_first_byte_s": round(median(r["open_to_first_byte_s"] for r in rule_rows), 3),
            "rule_s": round(median(r["rule_s"] for r in rule_rows), 3),
            "overhead_s": round(median(r["overhead_s"] for r in rule_rows), 3),
            "overhead_max_s": round(max(r["overhead_s"] for r in rule_rows), 3),
        },
        "first_byte": {
            "stream_s": round(median(first["stream"]), 4),
            "hybrid_while_replicating_s": round(median(first["hybrid"]), 4),
        },
    }
    ratio = summary["first_byte"]["hybrid_while_replicating_s"] / max(summary["first_byte"]["stream_s"], 1e-9)
    summary["first_byte"]["hybrid_over_stream"] = round(ratio, 2)
    if prefetch is not None:
        summary["prefetch_10k"] = prefetch
    table = "\n".join([
        f"# staging benchmark ({datetime.date.today()}, {args.runs} runs, medians)",
        "",
        "| measure | datalakefs | reference | ratio |",
        "|---|---|---|---|",
        f"| rule mode: open() to first byte vs the rule's own time | {summary['rule_mode']['open_to_first_byte_s']} s"
        f" | {summary['rule_mode']['rule_s']} s | overhead {summary['rule_mode']['overhead_s']} s "
        f"(max {summary['rule_mode']['overhead_max_s']} s) |",
        f"| first byte: hybrid (rule replicating) vs stream mode"
        f" | {summary['first_byte']['hybrid_while_replicating_s']} s"
        f" | {summary['first_byte']['stream_s']} s | {ratio:.2f} |",
    ] + ([f"| `datalakefs stage {prefetch['dataset']} --wait` | {prefetch['seconds']} s | | "
          f"{prefetch['result']} |"] if prefetch else []))
    print(table)
    out = RESULTS / str(datetime.date.today())
    out.mkdir(parents=True, exist_ok=True)
    (out / "staging.md").write_text(table + "\n")
    (out / "staging.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
