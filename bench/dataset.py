"""Every file of a dataset, in listing order, as a notebook loop reads it (issue 16).

``python -m bench.dataset``: ``ls -l`` of the 10k dataset and then ``cat`` of every file, on a fresh
mount (cold: empty block cache, page cache dropped) and again with the block cache warm (page cache
dropped), against ``curl -K`` of the same URLs on one kept-alive connection, curl run once per file
(one request after another, each on its own connection), ``cat`` of the same files on the origin's
local disk, and the peers rclone (WebDAV) and xrootdfs (root://) mounting the origin's scope directory
(no dataset directory there: they ``stat`` every file by its path, then read it). A last row times
``open`` + the first byte of files in a directory that was just listed. Each datalakefs row also
records the daemon's catalogue calls, checked against the requests the Rucio server logged (a
mismatch is flagged in the notes).
``BENCH_DATASET_FILES`` reads only the first N files (a smoke test: ``BENCH_DATASET_FILES=50``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import mounts
from bench.distance import Distance, at_distance, rtt_label, rtts_ms
from bench.env import (
    BenchError,
    collection_path,
    drop_caches,
    first_byte,
    lake,
    median,
    rucio_client,
    run_timed,
    runs,
    setting,
    timed,
    workdir,
)
from bench.mounts import DatalakefsMount, datalakefs
from bench.report import Goal, Row, SuiteResult, context, write_suite
from bench.rucio_log import RucioRequests, compare

WORKLOAD = "every file of the 10k dataset"


FIRST_BYTE_FILES = 20  # files whose first byte is timed after the listing (the row's median)
CACHE_PREFIX = "cache-"
PARALLEL_READERS = (4, 16)  # reader processes that split the dataset's files between them


def split(items: list[str], parts: int) -> list[list[str]]:
    """``items`` in ``parts`` contiguous slices of (nearly) equal length, in order; no slice is empty."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    bounds = [k * size + min(k, extra) for k in range(parts + 1)]
    return [items[bounds[k]:bounds[k + 1]] for k in range(parts)]


def run_parallel(commands: list[list[str]], env: dict[str, str]) -> float:
    """Seconds until every command, all started at once, has finished; raises when one fails."""
    start = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for argv in commands]
    failed = [(argv[0], proc.communicate()[1]) for argv, proc in zip(commands, procs, strict=True) if proc.wait()]
    elapsed = time.perf_counter() - start
    if failed:
        raise BenchError(f"{failed[0][0]} failed: {failed[0][1].decode(errors='replace')[-300:]}")
    return elapsed


def read_every_file(directory: Path, limit: int) -> int:
    """``ls -l`` then ``cat`` of the first ``limit`` files in listing order; returns the bytes read."""
    return stat_and_read([Path(entry.path) for entry in sorted(os.scandir(directory), key=lambda e: e.name)[:limit]])


def stat_and_read(paths: list[Path]) -> int:
    """``stat`` every path, then read every file whole; returns the bytes read."""
    for path in paths:
        path.stat()
    total = 0
    for path in paths:
        with open(path, "rb") as fh:
            total += len(fh.read())
    return total


def catalogue_calls(mount: DatalakefsMount) -> int:
    return sum(mount.status()["catalogue"]["calls"].values())


class Suite:
    def __init__(self) -> None:
        self.lake = lake()
        self.dataset = self.lake.seed.dataset_10k
        self.limit = setting("BENCH_DATASET_FILES", 10_000)
        self.slow_limit = setting("BENCH_RTT_SLOW_FILES", 300)  # at an RTT > 0: sequential curl and the peers
        self.distance = Distance(0)
        self.n = runs()
        self.result = SuiteResult("dataset", context={**context(), "dataset": self.dataset, "files": self.limit})

    def files(self) -> list[str]:
        """The dataset's file DIDs in listing (name) order."""
        scope, name = self.dataset.split(":", 1)
        rows = rucio_client().list_content(scope, name)
        return sorted(f"{row['scope']}:{row['name']}" for row in rows)[: self.limit]

    @property
    def workload(self) -> str:
        return f"{WORKLOAD}, {rtt_label(self.distance.rtt_ms)}"

    def slow_files(self, files: list[str]) -> list[str]:
        """The files a one-request-at-a-time tool reads (curl, the peers): all at 0 ms, the first ``slow_limit``
        further away (10k requests one after another at 30 ms take 5 minutes a run)."""
        return files if self.distance.rtt_ms == 0 else files[: self.slow_limit]

    def mount_options(self) -> tuple[str, ...]:
        return self.distance.mount_options or ("xcache=none",)

    def add(self, tool: str, state: str, seconds: list[float], files: int, **extra: float) -> None:
        """A row; ``files`` (how many files the tool read) is kept so that goals compare seconds per file."""
        if files < self.limit:
            tool = f"{tool} (first {files} files)"
        self.result.rows.append(Row(self.workload, tool, state, median(seconds), runs=len(seconds),
                                    extra={"files": files, **extra}))
        print(f"[dataset] {self.workload}: {tool} {state}: {median(seconds):.3f} s {extra}", flush=True)

    def references(self, work: Path) -> None:
        files = self.slow_files(self.files())
        config = work / "curl.cfg"
        config.write_text("".join(f'url = "{self.distance.origin_url(did)}"\noutput = "/dev/null"\n'
                                  for did in files))
        env = self.lake.client_env()
        self.add("curl -K (one connection)", "cold",
                 [run_timed(["curl", "-sS", "-K", str(config)], env=env) for _ in range(self.n)], len(files))
        urls = [self.distance.origin_url(did) for did in files]

        def curl_each() -> None:
            for url in urls:
                run_timed(["curl", "-sS", "-o", "/dev/null", url], env=env)

        self.add("curl, one process per file (sequential)", "cold", [timed(curl_each)[0] for _ in range(self.n)],
                 len(urls))
        if self.distance.rtt_ms:
            return  # the local disk is at no distance
        local = [self.lake.replica_file(did) for did in files]

        def cat_local() -> None:
            for path in local:
                path.read_bytes()

        seconds = []
        for _ in range(self.n):
            drop_caches()
            seconds.append(timed(cat_local)[0])
        self.add("cat on the local disk", "cold", seconds, len(local))

    def datalakefs(self, work: Path) -> None:
        requests = RucioRequests(Path(self.lake.status.paths["log"]))
        for state in ("cold", "warm"):
            seconds, calls, logged = [], [], []
            for index in range(self.n):
                with datalakefs(work / "mnt", fresh_cache(work), *self.mount_options()) as mount:
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
            self.add("datalakefs", state, seconds, self.limit, catalogue_calls=median([float(c) for c in calls]),
                     rucio_log_requests=median([float(r.catalogue) for r in logged]))

    def peers(self, work: Path) -> None:
        """rclone and xrootdfs on the same files, cold: a fresh mount (and rclone cache) per run."""
        files = [self.lake.replica_file(did).relative_to(self.lake.rse_dir) for did in self.slow_files(self.files())]
        scope = files[0].parts[0]  # the origin refuses to list its root: mount the scope's directory
        inside = [Path(*f.parts[1:]) for f in files]
        peers = {
            "rclone webdav": lambda mnt, i: mounts.rclone_webdav(
                mnt, f"{self.distance.url('origin_http')}/{scope}/", fresh_cache(work), work / "rclone.log"),
            "xrootdfs": lambda mnt, i: mounts.xrootdfs(
                mnt, f"{self.distance.url('origin_root')}//{scope}/", work / "xrootdfs.log"),
        }
        for tool, mount in peers.items():
            if shutil.which(tool.split()[0]) is None:
                self.result.notes.append(f"{tool}: not installed")
                continue
            mnt = work / f"mnt-{tool.split()[0]}"
            seconds = []
            for index in range(self.n):
                with mount(mnt, index):
                    drop_caches()
                    seconds.append(timed(functools.partial(stat_and_read, [mnt / f for f in inside]))[0])
            self.add(tool, "cold", seconds, len(files))

    def first_byte_after_listing(self, work: Path) -> None:
        """``ls -l`` of the dataset on a fresh mount, then open + first byte of its first files."""
        samples = []
        for _ in range(self.n):
            with datalakefs(work / "mnt", fresh_cache(work), *self.mount_options()) as mount:
                directory = collection_path(mount.mountpoint, self.dataset)
                listed = sorted(os.scandir(directory), key=lambda entry: entry.name)
                for entry in listed:
                    entry.stat()
                samples += [first_byte(Path(entry.path), 1) for entry in listed[:FIRST_BYTE_FILES]]
        self.result.rows.append(Row(f"first byte after ls -l (median of {FIRST_BYTE_FILES} files × runs), "
                                    f"{rtt_label(self.distance.rtt_ms)}", "datalakefs", "cold", median(samples),
                                    runs=self.n))
        print(f"[dataset] first byte after ls -l: {median(samples) * 1000:.2f} ms", flush=True)

    def parallel_readers(self, work: Path) -> None:
        """The files split across 4 and 16 ``cat`` processes (after ``ls -l``), against ``curl -K`` split likewise."""
        env = self.lake.client_env()
        urls = [self.distance.origin_url(did) for did in self.slow_files(self.files())]
        for readers in PARALLEL_READERS:
            configs = []
            for k, part in enumerate(split(urls, readers)):
                config = work / f"curl-{readers}-{k}.cfg"
                config.write_text("".join(f'url = "{url}"\noutput = "/dev/null"\n' for url in part))
                configs.append(["curl", "-sS", "-K", str(config)])
            drop_caches()
            self.add(f"curl -K ×{readers} processes", "cold", [run_parallel(configs, env) for _ in range(self.n)],
                     len(urls))
            seconds = []
            for _ in range(self.n):
                with datalakefs(work / "mnt", fresh_cache(work), *self.mount_options()) as mount:
                    directory = collection_path(mount.mountpoint, self.dataset)
                    listed = sorted(os.scandir(directory), key=lambda entry: entry.name)[: self.limit]
                    for entry in listed:
                        entry.stat()
                    drop_caches()
                    parts = split([entry.path for entry in listed], readers)
                    seconds.append(run_parallel([["cat", *part] for part in parts], env))
            self.add(f"datalakefs, cat ×{readers} processes", "cold", seconds, self.limit)

    def goals(self) -> None:
        """The issue's goals at this RTT, each a ratio of seconds per file to a reference of the same run."""
        label = rtt_label(self.distance.rtt_ms)

        def per_file(tool: str, state: str = "cold") -> float | None:
            for row in self.result.rows:
                if row.workload == self.workload and row.state == state and row.seconds and (
                        row.tool == tool or row.tool.startswith(f"{tool} (first ")):
                    return row.seconds / row.extra["files"]
            return None

        def ratio(name: str, state: str, reference: str, limit: float) -> None:
            ours, theirs = per_file("datalakefs", state), per_file(reference)
            if ours and theirs:
                self.result.goals.append(Goal(f"{name}, {label}", ours / theirs, limit, "<=",
                                              f"{ours * 1000:.2f} vs {theirs * 1000:.2f} ms per file",
                                              reference=reference))

        if self.distance.rtt_ms == 0:
            ratio("cold ≤ 3× curl -K", "cold", "curl -K (one connection)", 3.0)
            ratio("warm ≤ 3× local cat", "warm", "cat on the local disk", 3.0)
        else:
            ratio("cold ≤ 0.2× sequential curl", "cold", "curl, one process per file (sequential)", 0.2)
        peers = {tool: per_file(tool) for tool in ("rclone webdav", "xrootdfs")}
        measured = {tool: seconds for tool, seconds in peers.items() if seconds}
        if measured:
            ratio("cold faster than every peer", "cold", min(measured, key=lambda tool: measured[tool]), 1.0)
        for row in self.result.rows:
            if row.workload.startswith("first byte after ls -l") and row.workload.endswith(label) and row.seconds:
                self.result.goals.append(Goal(f"first byte after ls -l ≤ 5 ms (ms), {label}", row.seconds * 1000,
                                              5.0, "<="))
        for row in self.result.rows:
            if row.workload == self.workload and (row.tool, row.state) == ("datalakefs", "cold"):
                self.result.goals.append(Goal(f"catalogue calls for ls -l + every file, cold, {label}",
                                              row.extra["catalogue_calls"], 5, "<="))

    def measure(self) -> SuiteResult:
        steps: list[tuple[str, Callable[[Path], None]]] = [("references", self.references),
                                                             ("datalakefs", self.datalakefs),
                                                             ("peers", self.peers),
                                                             ("parallel readers", self.parallel_readers),
                                                             ("first byte after ls -l", self.first_byte_after_listing)]
        with workdir("dataset") as work:
            for rtt_ms in rtts_ms():
                with at_distance(rtt_ms, work) as self.distance:
                    for name, step in steps:
                        print(f"[dataset] {rtt_label(rtt_ms)}: {name}", flush=True)
                        try:
                            step(work)
                        except Exception as exc:  # one broken tool must not lose the others
                            self.result.notes.append(f"{rtt_label(rtt_ms)}: {name}: failed: {exc}")
                            print(f"[dataset] {name} failed: {exc!r}", flush=True)
                    self.goals()
            for cache in work.glob(f"{CACHE_PREFIX}*"):  # after every run, not before one: see fresh_cache
                shutil.rmtree(cache, ignore_errors=True)
        self.result.notes.append(
            f"command: `python -m bench.dataset` (BENCH_RUNS={self.n}, BENCH_DATASET_FILES={self.limit}, "
            f"BENCH_RTT_MS={','.join(f'{r:g}' for r in rtts_ms())}, BENCH_RTT_SLOW_FILES={self.slow_limit}); "
            "medians; datalakefs with xcache=none at 0 ms, through the latency proxies (bench/distance.py) "
            "further away; cold = fresh mount and cache, page cache dropped; warm = block cache filled by a "
            "first pass, page cache dropped; goals compare seconds per file")
        return self.result


def fresh_cache(work: Path) -> Path:
    """A cache directory no run used before (cold means cold). Nothing is deleted right before a run:
    ext4 passes over inodes freed in the last minutes when it allocates new ones, so a cold run that
    created 10k cache files right after 30k were deleted spent twice the kernel time (perf: most of
    it in ``recently_deleted``, under ``ext4_create``/``ext4_mkdir``). The suite removes them at its end."""
    return Path(tempfile.mkdtemp(prefix=CACHE_PREFIX, dir=work))


def run() -> SuiteResult:
    result = Suite().measure()
    write_suite(result)
    return result


if __name__ == "__main__":
    run()
