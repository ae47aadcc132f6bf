"""Outbox benchmark (issue 7): uploads through datalakefs against curl PUTs to the same RSE, in one run.

1. One big file (1 GiB): time until ``close()`` returns when copied into the outbox, and until the
   upload is done (replica AVAILABLE, attached: the file left the outbox), against one
   ``curl -T`` of the same file to the same RSE's WebDAV door (goal, issue 13: ≤ 1.5×); and once more on a
   mount with ``upload_while_writing=0`` (sent only after ``close()``).
2. Many 1 MiB files (1,000), copied in by as many writers as the uploader's ``upload_concurrency``:
   aggregate rate from the first write until the last one is uploaded, against ``curl`` PUTs of the
   same files with the same parallelism (goal ≥ 0.8×).

Next to wall time, each datalakefs row gives the CPU-seconds the daemon spent per GiB (all its
threads, from ``/proc/<pid>/stat``), and each curl row those of curl: unlike wall time on a shared
machine, CPU-seconds barely move with the load.

``BENCH_RUNS`` runs of each on one mount; ``BENCH_OUTBOX_BIG_MIB`` (default 1024) and
``BENCH_OUTBOX_SMALL_COUNT`` (default 1000) shrink the files for a quick run; ``BENCH_OUTBOX_ONLY=big``
(or ``small``) runs one of the two cases alone. ``python -m bench.outbox`` runs this suite alone.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import mounts
from bench.env import WORK, BenchError, Lake, cpu_seconds, lake, median, rucio_client, runs, setting
from bench.report import Goal, Row, SuiteResult, context, write_suite

NAME = "outbox"
CHUNK = 1 << 20
PARALLEL = 4
PFNS_PER_CALL = 20  # the LFNs travel in the URL
GIB = 1 << 30
CASES = ("big", "small")


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        for start in range(0, size, CHUNK):
            fh.write(os.urandom(min(CHUNK, size - start)))


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)


def _uploaded(paths: list[Path], timeout: float = 3600.0) -> float:
    """``time.monotonic()`` when every path has left the outbox (uploaded, AVAILABLE, attached)."""
    deadline = time.monotonic() + timeout
    pending = list(paths)
    while pending:
        pending = [p for p in pending if p.exists()]
        if time.monotonic() > deadline:
            raise BenchError(f"uploads did not finish: {len(pending)} left")
        time.sleep(0.02)
    return time.monotonic()


def _cases() -> tuple[str, ...]:
    """The cases to run: ``BENCH_OUTBOX_ONLY`` names one of :data:`CASES`, else all of them."""
    only = os.environ.get("BENCH_OUTBOX_ONLY", "")
    if not only:
        return CASES
    if only not in CASES:
        raise BenchError(f"BENCH_OUTBOX_ONLY={only!r}: expected one of {', '.join(CASES)}")
    return (only,)


def _children_cpu_seconds() -> float:
    """User + system CPU-seconds of this process's finished children (the curls)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _per_gib(cpu: list[float], size: int) -> dict[str, float]:
    return {"cpu_s_per_GiB": median(cpu) * GIB / size}


def _curl_put(lk: Lake, files: list[tuple[Path, str]], ca: Path, parallel: int) -> float:
    """Seconds for PUTting every (file, url) with ``parallel`` curls at once."""
    lines = "".join(f"{path}\t{url}\n" for path, url in files)
    # the lake's doors refuse anonymous PUTs: curl presents the demo proxy, as the mounts do
    script = (f'IFS=$\'\\t\' read -r f u <<< "$1"; '
              f'curl -sS -f --cacert {ca} --cert {lk.status.env["X509_USER_PROXY"]} -T "$f" "$u" -o /dev/null')
    start = time.monotonic()
    subprocess.run(["xargs", "-d", "\n", "-P", str(parallel), "-I{}", "bash", "-c", script, "_", "{}"],
                   input=lines, text=True, env=lk.client_env(), check=True)
    return time.monotonic() - start


def _new_dataset(mountpoint: Path, scope: str, made: list[str]) -> tuple[str, Path]:
    """A new outbox dataset directory (its name goes into ``made``): (tag, path)."""
    tag = secrets.token_hex(4)
    dataset = mountpoint / ".outbox" / scope / f"bench_{tag}"
    dataset.mkdir()
    made.append(dataset.name)
    return tag, dataset


def _delete(lk: Lake, urls: list[str], ca: Path) -> None:
    """Remove what the curl side PUT: it is registered nowhere, so nothing else ever would."""
    for url in urls:
        subprocess.run(["curl", "-sS", "--cacert", str(ca), "--cert", lk.status.env["X509_USER_PROXY"], "-X", "DELETE",
                        url, "-o", "/dev/null"], env=lk.client_env(), check=False)


def _purge(client: Any, scope: str, datasets: list[str]) -> None:
    """Hand the uploaded bytes to Rucio's reaper: the bench writes gigabytes per run."""
    for dataset in datasets:
        for rule in client.list_did_rules(scope, dataset):
            client.delete_replication_rule(rule["id"], purge_replicas=True)


def _write_pfns(client: Any, rse: str, lfns: list[str]) -> dict[str, str]:
    pfns: dict[str, str] = {}
    for start in range(0, len(lfns), PFNS_PER_CALL):
        pfns.update(client.lfns2pfns(rse, lfns[start : start + PFNS_PER_CALL], operation="write", scheme="https"))
    return pfns


def run() -> SuiteResult:
    lk = lake()
    n = runs()
    cases = _cases()
    big_bytes = setting("BENCH_OUTBOX_BIG_MIB", 1024) * CHUNK if "big" in cases else 0
    small_count = setting("BENCH_OUTBOX_SMALL_COUNT", 1000) if "small" in cases else 0
    result = SuiteResult(NAME, context=context())
    client = rucio_client()
    scope, rse = lk.seed.upload_scope, lk.seed.scratch_rse
    ca = lk.status.datalakefs_config.parent / "dav.crt"
    work = WORK / NAME
    shutil.rmtree(work, ignore_errors=True)
    (work / "small").mkdir(parents=True)
    source = work / "big.bin"
    _write_random(source, big_bytes)
    sources = [work / "small" / f"s{i:05d}" for i in range(small_count)]
    for path in sources:
        _write_random(path, CHUNK)

    # wall seconds, and CPU-seconds (``cpu_*``: the daemon's, or curl's)
    times: dict[str, list[float]] = {
        key: [] for key in ("close", "available", "curl", "small", "small_closed", "small_curl", "after_close",
                            "cpu_available", "cpu_curl", "cpu_small", "cpu_small_curl", "cpu_after_close")
    }
    datasets: list[str] = []  # what the runs uploaded, and the curl side's URLs: removed at the end
    curl_urls: list[str] = []

    def curl_put(key: str, files: list[tuple[Path, str]], parallel: int) -> None:
        cpu = _children_cpu_seconds()
        times[key].append(_curl_put(lk, files, ca, parallel))
        times[f"cpu_{key}"].append(_children_cpu_seconds() - cpu)

    if big_bytes:
        # the big file once more with upload_while_writing=0: what sending it while it is written saves
        with mounts.datalakefs(work / "mnt-after-close", work / "cache-after-close", f"storage_ca_bundle={ca}",
                               "upload_while_writing=0") as m:
            for _ in range(n):
                tag, dataset = _new_dataset(m.mountpoint, scope, datasets)
                target = dataset / f"big_after_close_{tag}.bin"
                start, cpu = time.monotonic(), cpu_seconds(m.pid)
                _copy(source, target)
                times["after_close"].append(_uploaded([target]) - start)
                times["cpu_after_close"].append(cpu_seconds(m.pid) - cpu)
    with mounts.datalakefs(work / "mnt", work / "cache", f"storage_ca_bundle={ca}",
                           f"upload_concurrency={PARALLEL}") as m:
        for _ in range(n):
            tag, dataset = _new_dataset(m.mountpoint, scope, datasets)
            if big_bytes:
                target = dataset / f"big_{tag}.bin"
                start, cpu = time.monotonic(), cpu_seconds(m.pid)
                _copy(source, target)
                times["close"].append(time.monotonic() - start)
                times["available"].append(_uploaded([target]) - start)
                times["cpu_available"].append(cpu_seconds(m.pid) - cpu)
                big_url = _write_pfns(client, rse, [f"{scope}:curl_big_{tag}.bin"])[f"{scope}:curl_big_{tag}.bin"]
                curl_urls.append(big_url)
                curl_put("curl", [(source, big_url)], 1)
            if small_count:
                targets = [dataset / f"small_{tag}_{i:05d}" for i in range(small_count)]
                start, cpu = time.monotonic(), cpu_seconds(m.pid)
                with ThreadPoolExecutor(PARALLEL) as writers:
                    list(writers.map(_copy, sources, targets))
                times["small_closed"].append(time.monotonic() - start)
                times["small"].append(_uploaded(targets) - start)
                times["cpu_small"].append(cpu_seconds(m.pid) - cpu)
                lfns = [f"{scope}:curl_small_{tag}_{i:05d}" for i in range(small_count)]
                pfns = _write_pfns(client, rse, lfns)
                curl_urls += pfns.values()
                curl_put("small_curl", [(s, pfns[lfn]) for s, lfn in zip(sources, lfns, strict=True)], PARALLEL)
    shutil.rmtree(work, ignore_errors=True)
    _delete(lk, curl_urls, ca)
    _purge(client, scope, datasets)

    if big_bytes:
        close, available, curl = median(times["close"]), median(times["available"]), median(times["curl"])
        big = f"write {big_bytes // CHUNK} MiB"
        result.rows += [
            Row(big, "datalakefs outbox", "close() returned", close, big_bytes / close / 1e6, runs=n),
            Row(big, "datalakefs outbox", "uploaded (AVAILABLE, attached)", available, big_bytes / available / 1e6,
                runs=n, extra=_per_gib(times["cpu_available"], big_bytes)),
            Row(big, "datalakefs outbox, upload_while_writing=0", "uploaded (AVAILABLE, attached)",
                median(times["after_close"]), big_bytes / median(times["after_close"]) / 1e6, runs=n,
                extra=_per_gib(times["cpu_after_close"], big_bytes)),
            Row(big, "curl PUT, same RSE", "-", curl, big_bytes / curl / 1e6, runs=n,
                extra=_per_gib(times["cpu_curl"], big_bytes)),
        ]
        result.goals.append(
            Goal(f"{big_bytes // CHUNK} MiB: time to AVAILABLE ≤ 1.5× curl PUT", available / curl, 1.5, "<=",
                 f"{available:.2f} vs {curl:.2f} s; close() returned after {close:.2f} s", reference="curl PUT"))
    if small_count:
        small, small_curl = median(times["small"]), median(times["small_curl"])
        small_bytes = small_count * CHUNK
        many = f"write {small_count} × 1 MiB"
        result.rows += [
            Row(many, f"datalakefs outbox ({PARALLEL} writers, upload_concurrency={PARALLEL})", "all uploaded", small,
                small_bytes / small / 1e6, runs=n, extra=_per_gib(times["cpu_small"], small_bytes),
                note=f"last close() after {median(times['small_closed']):.2f} s"),
            Row(many, f"curl PUT, {PARALLEL} in parallel", "-", small_curl, small_bytes / small_curl / 1e6, runs=n,
                extra=_per_gib(times["cpu_small_curl"], small_bytes)),
        ]
        result.goals.append(
            Goal(f"{small_count} × 1 MiB: aggregate rate ≥ 0.8× parallel curl PUTs", small_curl / small, 0.8, ">=",
                 f"{small_bytes / small / 1e6:.1f} vs {small_bytes / small_curl / 1e6:.1f} MB/s",
                 reference="parallel curl PUTs"))
    result.notes.append(
        f"command: `python -m bench.outbox` (BENCH_RUNS={n}, BENCH_OUTBOX_BIG_MIB={big_bytes // CHUNK}, "
        f"BENCH_OUTBOX_SMALL_COUNT={small_count}, cases: {', '.join(cases)}); medians of {n} runs; "
        f"MB/s = 10^6 B/s; cpu_s_per_GiB = CPU-seconds (user + system) of the datalakefs daemon, or of the curls, "
        f"per GiB moved; outbox scope {scope}, RSE {rse}; curl PUTs the same source files to the RSE's WebDAV door "
        "(not registered in Rucio)")
    write_suite(result)
    return result


if __name__ == "__main__":
    run()
