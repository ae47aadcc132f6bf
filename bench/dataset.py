"""Every file of a dataset, in listing order, as a notebook loop reads it (issue 16).

``python -m bench.dataset``: ``ls -l`` of the 10k dataset and then ``cat`` of every file, on a fresh
mount (cold: empty block cache, page cache dropped) and again with the block cache warm (page cache
dropped), against ``curl -K`` of the same URLs on one kept-alive connection and ``cat`` of the same
files on the origin's local disk. Each datalakefs row also records the daemon's catalogue calls,
checked against the requests the Rucio server logged (a mismatch is flagged in the notes).
``BENCH_DATASET_FILES`` reads only the first N files (a smoke test: ``BENCH_DATASET_FILES=50``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from bench.env import collection_path, drop_caches, lake, median, rucio_client, run_timed, runs, setting, timed, workdir
from bench.mounts import DatalakefsMount, datalakefs
from bench.report import Goal, Row, SuiteResult, write_suite
from bench.rucio_log import RucioRequests, compare

WORKLOAD = "every file of the 10k dataset"


def read_every_file(directory: Path, limit: int) -> int:
    """``ls -l`` then ``cat`` of the first ``limit`` files in listing order; returns the bytes read."""
    entries = sorted(os.scandir(directory), key=lambda entry: entry.name)[:limit]
    for entry in entries:
        entry.stat()
    total = 0
    for entry in entries:
        with open(entry.path, "rb") as fh:
            total += len(fh.read())
    return total


def catalogue_calls(mount: DatalakefsMount) -> int:
    return sum(mount.status()["catalogue"]["calls"].values())


class Suite:
    def __init__(self) -> None:
        self.lake = lake()
        self.dataset = self.lake.seed.dataset_10k
        self.limit = setting("BENCH_DATASET_FILES", 10_000)
        self.n = runs()
        self.result = SuiteResult("dataset", context={"dataset": self.dataset, "files": self.limit})

    def files(self) -> list[str]:
        """The dataset's file DIDs in listing (name) order."""
        scope, name = self.dataset.split(":", 1)
        rows = rucio_client().list_content(scope, name)
        return sorted(f"{row['scope']}:{row['name']}" for row in rows)[: self.limit]

    def add(self, tool: str, state: str, seconds: list[float], **extra: float) -> None:
        self.result.rows.append(Row(WORKLOAD, tool, state, median(seconds), runs=len(seconds), extra=extra))
        print(f"[dataset] {tool} {state}: {median(seconds):.3f} s {extra}", flush=True)

    def references(self, work: Path) -> None:
        files = self.files()
        config = work / "curl.cfg"
        config.write_text("".join(f'url = "{self.lake.origin_url(did)}"\noutput = "/dev/null"\n' for did in files))
        self.add("curl -K (one connection)", "cold",
                 [run_timed(["curl", "-sS", "-K", str(config)], env=self.lake.client_env()) for _ in range(self.n)])
        local = [self.lake.replica_file(did) for did in files]

        def cat_local() -> None:
            for path in local:
                path.read_bytes()

        seconds = []
        for _ in range(self.n):
            drop_caches()
            seconds.append(timed(cat_local)[0])
        self.add("cat on the local disk", "cold", seconds)

    def datalakefs(self, work: Path) -> None:
        requests = RucioRequests(Path(self.lake.status.paths["log"]))
        for state in ("cold", "warm"):
            seconds, calls, logged = [], [], []
            for index in range(self.n):
                cache = work / f"cache{index}"
                with datalakefs(work / "mnt", cache, "xcache=none") as mount:
                    directory = collection_path(mount.mountpoint, self.dataset)
                    if state == "warm":
                        read_every_file(directory, self.limit)
                    drop_caches()
                    before = catalogue_calls(mount)
                    requests.mark()
                    seconds.append(timed(functools.partial(read_every_file, directory, self.limit))[0])
                    calls.append(catalogue_calls(mount) - before)
                    logged.append(requests.count())
                    check = compare(calls[-1], logged[-1])
                    print(f"[dataset] {state} run {index}: {check}", flush=True)
                    if calls[-1] != logged[-1].catalogue:
                        self.result.notes.append(f"datalakefs {state}, run {index}: {check}")
            self.add("datalakefs", state, seconds, catalogue_calls=median([float(c) for c in calls]),
                     rucio_log_requests=median([float(r.catalogue) for r in logged]))

    def goals(self) -> None:
        def med(tool: str, state: str, key: str | None = None) -> float | None:
            for row in self.result.rows:
                if (row.tool, row.state) == (tool, state):
                    return row.extra.get(key) if key else row.seconds
            return None

        pairs: list[tuple[str, str, str, float]] = [
            ("cold ≤ 3× curl -K", "cold", "curl -K (one connection)", 3.0),
            ("warm ≤ 3× local cat", "warm", "cat on the local disk", 3.0),
        ]
        for name, state, reference, limit in pairs:
            ours, theirs = med("datalakefs", state), med(reference, "cold")
            if ours and theirs:
                self.result.goals.append(Goal(name, ours / theirs, limit, "<=", f"{ours:.2f} vs {theirs:.2f} s",
                                              reference=reference))
        calls = med("datalakefs", "cold", "catalogue_calls")
        if calls is not None:
            self.result.goals.append(Goal("catalogue calls for ls -l + every file, cold", calls, 5, "<="))

    def measure(self) -> SuiteResult:
        steps: list[tuple[str, Callable[[Path], None]]] = [("references", self.references),
                                                             ("datalakefs", self.datalakefs)]
        with workdir("dataset") as work:
            for name, step in steps:
                print(f"[dataset] {name}", flush=True)
                try:
                    step(work)
                except Exception as exc:  # one broken tool must not lose the others
                    self.result.notes.append(f"{name}: failed: {exc}")
                    print(f"[dataset] {name} failed: {exc!r}", flush=True)
        self.goals()
        self.result.notes.append(
            f"command: `python -m bench.dataset` (BENCH_RUNS={self.n}, BENCH_DATASET_FILES={self.limit}); "
            "medians; datalakefs with xcache=none; cold = fresh mount and cache, page cache dropped; warm = "
            "block cache filled by a first pass, page cache dropped")
        return self.result


def run() -> SuiteResult:
    result = Suite().measure()
    write_suite(result)
    return result


if __name__ == "__main__":
    run()
