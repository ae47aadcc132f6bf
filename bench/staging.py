"""Staging benchmark (issue 6): rule staging and the hybrid read path, measured on the demo lake.

1. **Rule mode**: time from ``open()`` to the first byte of a file that is not staged yet, against the
   time the rule itself took (created → OK, seen by polling the rule every 50 ms from outside). The
   overhead goal is at most one poll interval of the daemon: the interval its back-off schedule
   (``poll_min`` doubling up to ``poll_max``) had reached when the rule turned OK.
2. **Hybrid vs stream**: first-byte latency (``open`` + 1-byte ``read``) of a cold file in ``auto`` mode
   while a rule (slowed by the FTS shim's delay knob) still replicates it, against a cold file in
   ``stream`` mode. Goal: equal (the hybrid path no slower than stream mode).
3. With ``BENCH_STAGING_10K=1``: ``datalakefs stage <dataset_10k> --wait``, the wall time until every
   lock is OK (once per lake: a staged dataset stays staged; about half an hour on a 2-core machine).

Every run of 1. and 2. uses files made for it (only on LAKE-ORIGIN), so nothing is cached or staged
before. ``BENCH_RUNS`` runs of each; ``python -m bench.staging`` runs this suite alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from bench import mounts
from bench.env import WORK, Lake, file_path, first_byte, lake, median, rucio_client, runs
from bench.report import Goal, Row, SuiteResult, context, write_suite
from datalakefs.demo import seed
from datalakefs.demo.lake import Lake as DemoLake
from datalakefs.demo.status import Knobs
from datalakefs.staging.rule import RuleStager

NAME = "staging"
MIB = 1 << 20
RULE_FILE_BYTES = MIB
HYBRID_FILE_BYTES = 8 * MIB
SHIM_DELAY = 10.0  # seconds the FTS shim waits before each copy: the rule still replicates at the first byte
POLL_DEFAULTS: dict[str, float] = RuleStager.__init__.__kwdefaults__ or {}


def fresh_file(lk: Lake, client: Any, size: int) -> tuple[str, seed.FileSpec]:
    """A new dataset of one file, only on LAKE-ORIGIN: its DID and the file."""
    scope = lk.seed.upload_scope
    name = f"bench_staging_{uuid.uuid4().hex[:10]}"
    spec = seed.FileSpec(scope, f"{name}.bin", size)
    seed.add_origin_dataset(client, DemoLake(lk.status.state_dir), seed.DatasetPlan(scope, name, (spec,)))
    return f"{scope}:{name}", spec


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


def poll_interval_at(elapsed: float, poll_min: float, poll_max: float) -> float:
    """The daemon's poll interval ``elapsed`` seconds after its poller started: it sleeps ``poll_min``,
    then twice as long each time, up to ``poll_max``."""
    interval = end = poll_min
    while end < elapsed:
        interval = min(interval * 2, poll_max)
        end += interval
    return interval


def bench_rule_mode(lk: Lake, client: Any, n: int) -> list[dict[str, float]]:
    rows = []
    work = WORK / NAME
    with mounts.datalakefs(work / "mnt-rule", work / "cache-rule", "staging=rule", "staging_timeout=300") as m:
        for _ in range(n):
            dataset, spec = fresh_file(lk, client, RULE_FILE_BYTES)
            seen: dict[str, float] = {}
            started = time.time()
            watcher = rule_ok_watch(client, spec, lk.seed.scratch_rse, seen)
            latency = first_byte(file_path(m.mountpoint, dataset, spec.did), 1)
            watcher.join(timeout=60)
            rule_s = seen["ok"] - seen["created"]
            rows.append({"open_to_first_byte_s": latency, "rule_s": rule_s,
                         "overhead_s": started + latency - seen["ok"],
                         "poll_interval_s": poll_interval_at(rule_s, POLL_DEFAULTS["poll_min"],
                                                             POLL_DEFAULTS["poll_max"])})
    return rows


def bench_first_byte(lk: Lake, client: Any, n: int) -> dict[str, list[float]]:
    control = DemoLake(lk.status.state_dir)
    knobs = control.read_knobs()
    results: dict[str, list[float]] = {"stream": [], "hybrid": []}
    work = WORK / NAME
    try:
        control.write_knobs(Knobs(delay=SHIM_DELAY))
        with mounts.datalakefs(work / "mnt-stream", work / "cache-stream", "staging=stream") as stream, \
                mounts.datalakefs(work / "mnt-auto", work / "cache-auto", "staging=auto") as auto:
            for _ in range(n):
                dataset, plain = fresh_file(lk, client, HYBRID_FILE_BYTES)
                results["stream"].append(first_byte(file_path(stream.mountpoint, dataset, plain.did), 1))
                dataset, staged = fresh_file(lk, client, HYBRID_FILE_BYTES)
                client.add_replication_rule([staged.as_ref()], 1, lk.seed.scratch_rse, lifetime=3600)
                results["hybrid"].append(first_byte(file_path(auto.mountpoint, dataset, staged.did), 1))
    finally:
        control.write_knobs(knobs)
    return results


def bench_prefetch_10k(lk: Lake) -> Row:
    argv = [sys.executable, "-m", "datalakefs", "stage", "--config", str(lk.status.datalakefs_config),
            lk.seed.dataset_10k, "--wait"]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=lk.client_env(), check=False)
    return Row(f"prefetch {lk.seed.dataset_10k}", "datalakefs stage --wait", "not staged",
               time.perf_counter() - started, extra={"exit_status": done.returncode},
               note=(done.stdout.strip().splitlines() or [""])[-1])


def run() -> SuiteResult:
    lk = lake()
    n = runs()
    result = SuiteResult(NAME, context=context())
    shutil.rmtree(WORK / NAME, ignore_errors=True)
    (WORK / NAME).mkdir(parents=True)
    client = rucio_client()
    rule = bench_rule_mode(lk, client, n)
    first = bench_first_byte(lk, client, n)
    shutil.rmtree(WORK / NAME, ignore_errors=True)

    def med(key: str) -> float:
        return median([r[key] for r in rule])

    overhead_max = max(r["overhead_s"] for r in rule)
    result.rows += [
        Row(f"open → first byte, {RULE_FILE_BYTES // MIB} MiB not staged", "datalakefs staging=rule", "cold",
            med("open_to_first_byte_s"), runs=n,
            extra={"overhead_s": round(med("overhead_s"), 3), "overhead_max_s": round(overhead_max, 3),
                   "poll_interval_s": med("poll_interval_s")}),
        Row(f"open → first byte, {RULE_FILE_BYTES // MIB} MiB not staged", "the rule itself (created → OK)", "-",
            med("rule_s"), runs=n, note="seen by polling the rule every 50 ms from outside"),
        Row(f"first byte, {HYBRID_FILE_BYTES // MIB} MiB", "datalakefs staging=stream", "cold",
            median(first["stream"]), runs=n),
        Row(f"first byte, {HYBRID_FILE_BYTES // MIB} MiB", "datalakefs staging=auto (hybrid)", "rule replicating",
            median(first["hybrid"]), runs=n, note=f"FTS shim delay {SHIM_DELAY:g} s"),
    ]
    stream, hybrid = median(first["stream"]), median(first["hybrid"])
    result.goals += [
        Goal("rule mode: overhead ≤ one poll interval (in intervals)",
             median([r["overhead_s"] / r["poll_interval_s"] for r in rule]), 1.0, "<=",
             f"overhead {med('overhead_s'):.3f} s (max {overhead_max:.3f} s), interval in effect when the rule "
             f"turned OK {med('poll_interval_s'):g} s"),
        Goal("hybrid first byte = stream first byte (hybrid / stream)", hybrid / stream, 1.0, "<=",
             f"{hybrid:.4f} vs {stream:.4f} s", reference="staging=stream"),
    ]
    if os.environ.get("BENCH_STAGING_10K") == "1":
        result.rows.append(bench_prefetch_10k(lk))
    result.notes.append(
        f"command: `python -m bench.staging` (BENCH_RUNS={n}); medians of {n} runs; each run stages files made "
        f"for it; daemon polls rules after {POLL_DEFAULTS['poll_min']:g} s, doubling up to "
        f"{POLL_DEFAULTS['poll_max']:g} s; overhead = first byte − the rule's OK, seen from outside")
    write_suite(result)
    return result


if __name__ == "__main__":
    run()
