"""Listing benchmark (issue 4): catalogue listing, ``ls -l`` and ``find`` through datalakefs, and rclone.

In one run, against the demo lake:

* **raw catalogue**: ``list_content`` and ``list_files`` through rucio-clients (an authenticated client,
  so only the listing is timed) for the 10k and 100k datasets;
* **datalakefs ``ls -l``** of those datasets, *cold* (a fresh mount; the scope directory is listed
  first so the client's authentication is not counted) and *warm* (the same ``ls -l`` again);
* **``find``** over the seed's container, cold and warm;
* **rclone** (webdav remote on the lake's nginx, the peer users pick today): ``ls -l`` of a flat
  directory in the storage tree holding the same 10,000 files (hard links made for the benchmark),
  cold (fresh mount) and warm;
* **daemon RSS** after listing the 100k dataset.

Goals (issue 4): 10k cold ≤ 2× raw and ≤ raw + 0.3 s; 10k warm ≤ 0.1 s; 100k cold ≤ 3 s; RSS ≤ 300 MB.
Goals (issue 16): 100k cold ≤ 1.7× raw ``list_files``; 100k warm ≤ 0.5 s.
"raw" is ``list_content``, the call datalakefs makes for a listing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench import mounts
from bench.distance import Distance, at_distance, rtt_label, rtts_ms
from bench.env import (
    WORK,
    BenchError,
    Lake,
    collection_path,
    lake,
    median,
    rss_bytes,
    rucio_client,
    run_timed,
    runs,
    timed,
)
from bench.report import Goal, Row, SuiteResult, context, write_suite

NAME = "listing"


def _raw_listings(dataset: str, n: int, rucio_url: str) -> dict[str, float]:
    client = rucio_client(rucio_host=rucio_url, auth_host=rucio_url)
    client.whoami()  # authenticate outside the timing
    scope, name = dataset.split(":", 1)
    result = {}
    for call in ("list_content", "list_files"):
        times = []
        for _ in range(n):
            elapsed, rows = timed(lambda call=call: list(getattr(client, call)(scope, name)))
            times.append(elapsed)
        result[call] = median(times)
        result[f"{call}_entries"] = len(rows)
    return result


def _ls(path: Path) -> float:
    return run_timed(["ls", "-l", str(path)])


def _flat_copy(lk: Lake, dataset_dir_name: str, files: list[Path]) -> Path:
    """A directory of the storage tree with hard links to ``files`` (what a plain WebDAV user would list)."""
    flat = lk.rse_dir / "bench" / dataset_dir_name
    if flat.is_dir() and sum(1 for _ in os.scandir(flat)) == len(files):
        return flat
    shutil.rmtree(flat, ignore_errors=True)
    flat.mkdir(parents=True)
    for path in files:
        os.link(path, flat / path.name)
    return flat


def _dataset_files(lk: Lake, dataset: str, count: int) -> list[Path]:
    """Replica files of a ``many_*`` dataset, found on disk by the seed's naming (no catalogue call)."""
    scope, name = dataset.split(":", 1)
    width = len(str(count - 1))
    return [lk.replica_file(f"{scope}:{name}.f{i:0{width}d}.dat") for i in range(count)]


def run() -> SuiteResult:
    lk = lake()
    result = SuiteResult(NAME, context=context())
    work = WORK / NAME
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    datasets = [("10k", lk.seed.dataset_10k, 10_000)]
    if lk.seed.dataset_100k:
        datasets.append(("100k", lk.seed.dataset_100k, 100_000))
    else:
        result.notes.append("the lake has no 100k dataset (`datalakefs demo up --with-100k`): 100k rows skipped")
    for rtt_ms in rtts_ms():
        with at_distance(rtt_ms, work) as distance:
            _measure(result, distance, datasets, work)
    result.notes.append(f"command: `python -m bench.listing` (BENCH_RUNS={runs()}, BENCH_RTT_MS="
                        f"{','.join(f'{r:g}' for r in rtts_ms())}); medians; cold = a fresh mount with an empty "
                        "cache directory; rclone lists a flat directory of hard links to the same 10,000 replica "
                        "files through the lake's nginx WebDAV; beyond 0 ms Rucio and the WebDAV server are behind "
                        "the latency proxies (bench/distance.py)")
    write_suite(result)
    return result


def _measure(result: SuiteResult, distance: Distance, datasets: list[tuple[str, str, int]], work: Path) -> None:
    """Every row and goal of the suite with the lake at ``distance``; labels end with its RTT."""
    lk = lake()
    seed = lk.seed
    n = runs()
    at = f", {rtt_label(distance.rtt_ms)}"
    raw: dict[str, dict[str, float]] = {}
    for label, did, _ in datasets:
        raw[label] = r = _raw_listings(did, n, distance.url("rucio"))
        for call in ("list_content", "list_files"):
            result.rows.append(Row(f"list {label}{at}", f"rucio-clients {call}", "-", r[call], runs=n,
                                   extra={"entries": int(r[f"{call}_entries"])}))

    cold: dict[str, list[float]] = {label: [] for label, _, _ in datasets}
    warm: dict[str, list[float]] = {label: [] for label, _, _ in datasets}
    rss: list[int] = []
    for i in range(n):
        for label, did, count in datasets:
            with mounts.datalakefs(work / "mnt", work / f"cache-{label}-{i}", *distance.mount_options) as m:
                path = collection_path(m.mountpoint, did)
                os.listdir(path.parent)  # the scope: authenticates the daemon's client
                cold[label].append(_ls(path))
                warm[label].append(_ls(path))
                entries = len(os.listdir(path))
                if entries != count:
                    raise BenchError(f"{path} lists {entries} entries, expected {count}")
                if label == "100k":
                    rss.append(rss_bytes(m.pid))
    for label, _, _ in datasets:
        result.rows.append(Row(f"ls -l {label}{at}", "datalakefs", "cold", median(cold[label]), runs=n))
        result.rows.append(Row(f"ls -l {label}{at}", "datalakefs", "warm", median(warm[label]), runs=n))
    if rss:
        result.rows.append(Row(f"ls -l 100k{at}", "datalakefs", "daemon RSS after", None, runs=n,
                               extra={"rss_MB": round(median([float(x) for x in rss]) / 1e6, 1)}))

    # find over a container: cold on a fresh mount, then warm
    find_cold, find_warm, found = [], [], 0
    for i in range(n):
        with mounts.datalakefs(work / "mnt", work / f"cache-find-{i}", *distance.mount_options) as m:
            path = collection_path(m.mountpoint, seed.container)
            os.listdir(path.parent)
            find_cold.append(run_timed(["find", str(path)]))
            argv = ["find", str(path)]
            elapsed, done = timed(lambda argv=argv: subprocess.run(argv, capture_output=True, text=True, check=True))
            find_warm.append(elapsed)
            found = len(done.stdout.splitlines())
    result.rows.append(Row(f"find container{at}", "datalakefs", "cold", median(find_cold), runs=n,
                           extra={"entries": found}))
    result.rows.append(Row(f"find container{at}", "datalakefs", "warm", median(find_warm), runs=n))

    # rclone over the lake's nginx WebDAV, a flat directory of the same 10k files
    flat = _flat_copy(lk, "many_10k", _dataset_files(lk, seed.dataset_10k, 10_000))
    rc_cold, rc_warm = [], []
    url = f"{distance.url('dav_http')}/{flat.parent.relative_to(lk.rse_dir)}/"
    for i in range(n):
        with mounts.rclone_webdav(work / "rclone", url, work / f"rclone-cache-{i}", work / "rclone.log"):
            target = work / "rclone" / flat.name
            rc_cold.append(_ls(target))
            rc_warm.append(_ls(target))
    result.rows.append(Row(f"ls -l 10k{at}", "rclone webdav (nginx)", "cold", median(rc_cold), runs=n))
    result.rows.append(Row(f"ls -l 10k{at}", "rclone webdav (nginx)", "warm", median(rc_warm), runs=n))

    raw10 = raw["10k"]["list_content"]
    c10, w10 = median(cold["10k"]), median(warm["10k"])
    result.goals += [
        Goal(f"10k cold ≤ 2× raw list_content{at}", c10 / raw10, 2.0, "<=",
             f"{c10:.3f} s vs {raw10:.3f} s", reference="raw list_content"),
        Goal(f"10k cold ≤ raw + 0.3 s (s over raw){at}", c10 - raw10, 0.3, "<=", f"{c10:.3f} − {raw10:.3f} s"),
        Goal(f"10k warm ≤ 0.1 s{at}", w10, 0.1, "<="),
        Goal(f"10k cold vs rclone cold (× faster){at}", median(rc_cold) / c10, 1.0, ">=",
             f"rclone {median(rc_cold):.3f} s", reference="rclone cold"),
    ]
    if "100k" in cold:
        c100, w100, files100 = median(cold["100k"]), median(warm["100k"]), raw["100k"]["list_files"]
        result.goals.append(Goal(f"100k cold ≤ 3 s{at}", c100, 3.0, "<=",
                                 f"raw list_content {raw['100k']['list_content']:.3f} s"))
        result.goals += [  # issue 16's
            Goal(f"100k cold ≤ 1.7× raw list_files{at}", c100 / files100, 1.7, "<=",
                 f"{c100:.3f} s vs {files100:.3f} s", reference="raw list_files"),
            Goal(f"100k warm ≤ 0.5 s{at}", w100, 0.5, "<="),
        ]
        result.goals.append(Goal(f"daemon RSS after 100k ≤ 300 MB{at}", median([float(x) for x in rss]) / 1e6, 300.0,
                                 "<="))


if __name__ == "__main__":
    run()
