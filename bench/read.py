"""Read benchmark (issue 5): datalakefs against curl, raw Range GETs and the peer FUSE filesystems.

Everything reads the seed's 1 GiB file (``big_file``) from the demo lake's XRootD origin (XrdHttp) or
its XCache, side by side in one run:

* **sequential 1 GiB** (1 MiB ``readinto`` calls): *cold* = empty tool cache, fresh mount, page cache
  dropped (``echo 3 > /proc/sys/vm/drop_caches``, which also makes the origin read its disk); *warm* =
  the tool's own cache kept, fresh mount, page cache dropped; *hot* = read again at once. References:
  ``curl -o /dev/null`` and ``curl -o <file on the cache disk>`` from the origin, and a pyfuse3
  passthrough of the origin's directory (the FUSE ceiling on this machine);
* **through XCache**, cold (XCache wiped and restarted): curl against datalakefs with ``xcache`` set;
* **2,000 random 4 KiB reads** (4 KiB-aligned, fixed seed), cold and warm, with the bytes each tool
  fetched from the origin (datalakefs: its status.json counter; rclone: its cache's allocated size),
  against the same 2,000 keep-alive Range GETs with ``http.client``. Each row also gives the open and
  first read apart (``first_read_ms``: on a fresh datalakefs mount the file's replicas are asked of
  the catalogue there) and what each further read costs (``us_per_read``). **The floor** of a random
  read through a FUSE daemon written with pyfuse3 and trio: the same reads through a fresh mount of
  the pyfuse3 passthrough (``bench/passthrough.py``) of the local file, after the caches were dropped
  and the pages the reads touch were read into RAM under the mount, so that only the FUSE round trip
  is measured, not the disk (``fuse_us_per_read``: its µs per read beyond the same ``pread`` of the
  local file without FUSE, the row "local file"). A read through datalakefs pays one FUSE round trip
  and then one Range GET, one after the other, so per read its floor is roughly the passthrough's
  time per read plus one raw Range GET's: the goal's detail gives datalakefs against the passthrough
  and against that floor (passthrough + raw GETs), beside its ratio to the raw GETs;
* **time to first byte**: open + the first 4 KiB on a cold mount, against one Range GET on a new
  connection;
* **4 and 16 parallel readers**, each an equal slice of the file, cold, against as many parallel curl
  ranges (goal ≥ 0.7× curl) and as many readers through the pyfuse3 passthrough of the local file (what
  FUSE with pyfuse3 and trio delivers to parallel readers on this machine: the ceiling);
* **daemon CPU seconds per GiB** read cold (``/proc/<pid>/stat`` utime + stime).

Peers: rclone (webdav on the origin, ``--vfs-cache-mode full``), xrootdfs (root:// on the origin, no
cache of its own) and davfs2 (tried; skipped with the reason when it does not work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import mounts
from bench.distance import Distance, at_distance, rtt_label, rtts_ms
from bench.env import (
    WORK,
    BenchError,
    Lake,
    cpu_seconds,
    drop_caches,
    file_path,
    first_byte,
    lake,
    median,
    runs,
)
from bench.report import Goal, Row, SuiteResult, context, write_suite
from datalakefs.fuse.session import wait_gone

NAME = "read"
MIB = 1 << 20
RANDOM_READS = 2000
PAGE = 4096


# local disk, the lake's XCache, a skipped peer
NEAR_ONLY_STEPS = ("passthrough", "passthrough random", "xcache", "davfs2")
RANDOM = "random 4 KiB ×2000"
RAW_GETS = "Range GETs origin"
PASSTHROUGH_RANDOM = "pyfuse3 passthrough (local file, pages in RAM)"
LOCAL_RANDOM = "local file (pages in RAM, no FUSE)"
PARALLEL_READERS = (4, 16)  # threads reading one slice of the file each, against as many curl ranges

# ---- readers ---------------------------------------------------------------------------------------


def read_sequential(path: Path, start: int = 0, length: int | None = None) -> tuple[float, int]:
    """Seconds and bytes of reading ``path`` (or a slice) with 1 MiB ``readinto`` calls."""
    buf = bytearray(MIB)
    view = memoryview(buf)
    total = 0
    begin = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        if start:
            os.lseek(fd, start, os.SEEK_SET)
        while length is None or total < length:
            want = MIB if length is None else min(MIB, length - total)
            n = os.readv(fd, [view[:want]])
            if n == 0:
                break
            total += n
    finally:
        os.close(fd)
    return time.perf_counter() - begin, total


def offsets(size: int, seed: int = 5) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(size // PAGE) * PAGE for _ in range(RANDOM_READS)]


@dataclasses.dataclass(frozen=True)
class RandomRun:
    """One pass of the random reads: ``seconds`` for the open and every read, ``first`` for the open and
    the first read (on a fresh datalakefs mount, the file's replicas asked of the catalogue)."""

    seconds: float
    first: float
    reads: int

    @property
    def us_per_read(self) -> float:
        """Microseconds per read after the first: what each further read costs."""
        return (self.seconds - self.first) / max(self.reads - 1, 1) * 1e6

    def values(self) -> dict[str, float]:
        return {"seconds": self.seconds, "first_read_ms": self.first * 1e3, "us_per_read": self.us_per_read}


def read_random(path: Path, where: list[int]) -> RandomRun:
    begin = time.perf_counter()
    first = 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in where:
            if len(os.pread(fd, PAGE, offset)) != PAGE:
                raise BenchError(f"short read at {offset} of {path}")
            first = first or time.perf_counter() - begin
    finally:
        os.close(fd)
    return RandomRun(time.perf_counter() - begin, first, len(where))


def parallel(path: Path, size: int, readers: int = 4) -> float:
    """Seconds for ``readers`` threads to read one slice of the file each (reads release the GIL)."""
    part = size // readers
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            read_sequential(path, k * part, part if k < readers - 1 else size - k * part)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(readers)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - begin


def curl(url: str, out: str = "/dev/null", byte_range: str | None = None) -> dict[str, float]:
    argv = ["curl", "-sS", "--fail", "-o", out, "-w", "%{time_total} %{time_starttransfer} %{size_download}", url]
    if byte_range:
        argv[1:1] = ["-r", byte_range]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"curl {url} failed: {done.stderr.strip()}")
    total, ttfb, size = done.stdout.split()
    return {"seconds": float(total), "ttfb": float(ttfb), "bytes": float(size)}


def curl_parallel(url: str, size: int, readers: int = 4) -> float:
    part = size // readers
    begin = time.perf_counter()
    procs = []
    for k in range(readers):
        last = size - 1 if k == readers - 1 else (k + 1) * part - 1
        procs.append(subprocess.Popen(["curl", "-sS", "--fail", "-o", "/dev/null", "-r", f"{k * part}-{last}", url]))
    if any(p.wait() != 0 for p in procs):
        raise BenchError("a parallel curl failed")
    return time.perf_counter() - begin


def range_gets(url: str, where: list[int]) -> RandomRun:
    """The same random reads as keep-alive Range GETs on one connection (``http.client``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    begin = time.perf_counter()
    first = 0.0
    try:
        for offset in where:
            conn.request("GET", parts.path, headers={"Range": f"bytes={offset}-{offset + PAGE - 1}"})
            resp = conn.getresponse()
            if resp.status != 206 or len(resp.read()) != PAGE:
                raise BenchError(f"Range GET at {offset}: HTTP {resp.status}")
            first = first or time.perf_counter() - begin
    finally:
        conn.close()
    return RandomRun(time.perf_counter() - begin, first, len(where))


def first_range_get(url: str) -> float:
    parts = urlsplit(url)
    begin = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", parts.path, headers={"Range": f"bytes=0-{PAGE - 1}"})
        conn.getresponse().read()
    finally:
        conn.close()
    return time.perf_counter() - begin


def random_detail(ours: float, raw: float, passthrough: float | None, xrootdfs: float | None,
                  first_ms: float | None) -> str:
    """The random-read goal's figures beside its ratio: datalakefs against the pyfuse3 passthrough and
    against the floor, passthrough + raw GETs (each read pays one FUSE round trip and one Range GET, one
    after the other), and against xrootdfs; all in seconds for the same reads of the same run."""
    parts = [f"{ours:.3f} vs {raw:.3f} s"]
    if first_ms is not None:
        parts.append(f"first read (open, replicas from the catalogue) {first_ms:.1f} ms")
    if passthrough:
        floor = passthrough + raw
        parts.append(f"{ours / passthrough:.2f}× the pyfuse3 passthrough's {passthrough:.3f} s; "
                     f"{ours / floor:.2f}× the floor, passthrough + raw GETs = {floor:.3f} s")
    if xrootdfs:
        parts.append(f"{ours / xrootdfs:.2f}× xrootdfs's {xrootdfs:.3f} s")
    return "; ".join(parts)


def allocated(path: Path) -> int:
    """Bytes allocated under ``path`` (what a caching peer fetched and kept)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def mb_s(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e6


# ---- the lake's XCache -------------------------------------------------------------------------------


def restart_xcache(lk: Lake) -> None:
    """Stop the lake's XCache by its PID, empty its disk, and bring it back with ``demo up``."""
    status = lk.status.services["xcache"]
    if status.pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(status.pid, signal.SIGTERM)
            wait_gone(status.pid, 10.0)
    cache = Path(lk.status.paths["xcache"])
    for child in cache.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    done = subprocess.run([sys.executable, "-m", "datalakefs", "demo", "up", "--no-seed", "--state-dir",
                           str(lk.status.state_dir)], capture_output=True, text=True, check=False, timeout=300)
    if done.returncode != 0:
        raise BenchError(f"demo up failed after the XCache restart: {done.stderr[-800:]}")
    from bench import env

    env.lake.cache_clear()
    fresh = env.lake()
    object.__setattr__(lk, "status", fresh.status)


# ---- the suite -------------------------------------------------------------------------------------


class Suite:
    """Every step with the origin at ``distance`` (bench/distance.py); the local and XCache steps only at 0 ms."""

    def __init__(self, distance: Distance) -> None:
        self.distance = distance
        self.lk = lake()
        seed = self.lk.seed
        self.did = seed.big_file
        self.dataset = seed.sized_dataset
        self.size = self.lk.replica_file(self.did).stat().st_size
        self.origin_url = distance.origin_url(self.did)
        self.xcache_url = self.lk.origin_url(self.did, via="xcache_http")
        self.relative = self.lk.replica_file(self.did).relative_to(self.lk.rse_dir)
        self.where = offsets(self.size)
        self.n = runs()
        self.work = WORK / NAME
        self.result = SuiteResult(NAME, context=context())
        self.samples: dict[tuple[str, str, str], list[dict[str, float]]] = {}

    # bookkeeping
    def add(self, workload: str, tool: str, state: str, **values: float) -> None:
        self.samples.setdefault((workload, tool, state), []).append(values)

    def med(self, workload: str, tool: str, state: str, key: str = "seconds") -> float | None:
        found = self.samples.get((workload, tool, state))
        if not found:
            return None
        return median([s[key] for s in found if key in s])

    def rows(self) -> None:
        for (workload, tool, state), samples in self.samples.items():
            seconds = median([s["seconds"] for s in samples])
            nbytes = median([s.get("bytes", 0.0) for s in samples])
            extra: dict[str, Any] = {}
            for key in sorted({k for s in samples for k in s} - {"seconds", "bytes"}):
                values = [s[key] for s in samples if key in s]
                extra[key] = round(median(values), 4)
            rate = mb_s(nbytes, seconds) if nbytes >= MIB else None
            self.result.rows.append(Row(workload, tool, state, seconds, rate, runs=len(samples), extra=extra))

    def skip(self, what: str, why: str) -> None:
        self.result.notes.append(f"{what}: skipped — {why}")

    @property
    def peer_runs(self) -> int:
        """Runs of a peer: one beyond 0 ms (xrootdfs reads 1 GiB one small request at a time: minutes at 30 ms)."""
        return 1 if self.distance.rtt_ms else self.n

    # mounts
    @property
    def direct(self) -> tuple[str, ...]:
        """Mount options of a datalakefs that reads from the origin (through its proxy beyond 0 ms)."""
        return self.distance.mount_options or ("xcache=none",)

    def dlfs(self, cache: Path, *options: str) -> AbstractContextManager[mounts.DatalakefsMount]:
        return mounts.datalakefs(self.work / "mnt-dlfs", cache, *options)

    def dlfs_path(self, m: mounts.DatalakefsMount) -> Path:
        return file_path(m.mountpoint, self.dataset, self.did)

    # measurements
    def references(self) -> None:
        for _ in range(self.n):
            drop_caches()
            c = curl(self.origin_url)
            self.add("seq 1 GiB", "curl origin → /dev/null", "cold", seconds=c["seconds"], bytes=c["bytes"])
            drop_caches()
            out = self.work / "curl.out"
            c = curl(self.origin_url, str(out))
            out.unlink()
            self.add("seq 1 GiB", "curl origin → cache disk", "cold", seconds=c["seconds"], bytes=c["bytes"])
            drop_caches()
            self.add(RANDOM, RAW_GETS, "cold", **range_gets(self.origin_url, self.where).values(),
                     origin_MB=RANDOM_READS * PAGE / 1e6)
            self.add(RANDOM, RAW_GETS, "hot", **range_gets(self.origin_url, self.where).values())
            drop_caches()
            self.add("first byte", "Range GET origin (new connection)", "cold",
                     seconds=first_range_get(self.origin_url))
            for readers in PARALLEL_READERS:
                drop_caches()
                self.add(f"{readers} readers", f"curl origin ×{readers} ranges", "cold",
                         seconds=curl_parallel(self.origin_url, self.size, readers), bytes=self.size)

    def datalakefs(self, label: str, *options: str) -> None:
        tool = f"datalakefs{label}"
        for i in range(self.n):
            cache = self.work / f"cache-seq{label.strip()}-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            with self.dlfs(cache, *options) as m:
                path = self.dlfs_path(m)
                drop_caches()
                cpu = cpu_seconds(m.pid)
                before = m.status()["content"]
                seconds, nbytes = read_sequential(path)
                cpu = cpu_seconds(m.pid) - cpu
                fetched = m.status()["content"]["bytes_fetched"] - before["bytes_fetched"]
                self.add("seq 1 GiB", tool, "cold", seconds=seconds, bytes=nbytes,
                         cpu_s_per_GiB=cpu / (nbytes / 2**30), origin_MB=fetched / 1e6)
                hot, nbytes = read_sequential(path)
                self.add("seq 1 GiB", tool, "hot", seconds=hot, bytes=nbytes)
            with self.dlfs(cache, *options) as m:
                drop_caches()
                seconds, nbytes = read_sequential(self.dlfs_path(m))
                self.add("seq 1 GiB", tool, "warm", seconds=seconds, bytes=nbytes)
            shutil.rmtree(cache, ignore_errors=True)

    def datalakefs_random(self) -> None:
        for i in range(self.n):
            cache = self.work / f"cache-rand-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            with self.dlfs(cache, *self.direct) as m:
                path = self.dlfs_path(m)
                drop_caches()
                before = m.status()["content"]["bytes_fetched"]
                run = read_random(path, self.where)
                fetched = m.status()["content"]["bytes_fetched"] - before
                self.add(RANDOM, "datalakefs", "cold", **run.values(), origin_MB=fetched / 1e6,
                         origin_x_file=fetched / self.size)
            with self.dlfs(cache, *self.direct) as m:
                drop_caches()
                self.add(RANDOM, "datalakefs", "warm", **read_random(self.dlfs_path(m), self.where).values())
                self.add(RANDOM, "datalakefs", "hot", **read_random(self.dlfs_path(m), self.where).values())
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(self.work / f"cache-ttfb-{i}", ignore_errors=True)
            with self.dlfs(self.work / f"cache-ttfb-{i}", *self.direct) as m:
                path = self.dlfs_path(m)
                os.stat(path)  # the lookup is the catalogue's, not the read's
                drop_caches()
                self.add("first byte", "datalakefs (open + 4 KiB)", "cold", seconds=first_byte(path))
            shutil.rmtree(self.work / f"cache-ttfb-{i}", ignore_errors=True)
            cache = self.work / f"cache-par-{i}"
            for readers in PARALLEL_READERS:
                shutil.rmtree(cache, ignore_errors=True)
                with self.dlfs(cache, *self.direct) as m:
                    path = self.dlfs_path(m)
                    os.stat(path)
                    drop_caches()
                    self.add(f"{readers} readers", "datalakefs", "cold", seconds=parallel(path, self.size, readers),
                             bytes=self.size)
            shutil.rmtree(cache, ignore_errors=True)

    def rclone(self) -> None:
        if shutil.which("rclone") is None:
            self.skip("rclone", "not installed")
            return
        mnt = self.work / "mnt-rclone"
        for i in range(self.peer_runs):
            cache = self.work / f"rclone-cache-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            log = self.work / "rclone.log"
            # the origin refuses to stat "/": mount the file's own directory
            url = f"{self.distance.url('origin_http')}/{self.relative.parent}/"
            with mounts.rclone_webdav(mnt, url, cache, log, "--vfs-cache-mode", "full"):
                path = mnt / self.relative.name
                drop_caches()
                seconds, nbytes = read_sequential(path)
                self.add("seq 1 GiB", "rclone webdav (full cache)", "cold", seconds=seconds, bytes=nbytes)
                hot, nbytes = read_sequential(path)
                self.add("seq 1 GiB", "rclone webdav (full cache)", "hot", seconds=hot, bytes=nbytes)
            with mounts.rclone_webdav(mnt, url, cache, log, "--vfs-cache-mode", "full"):
                drop_caches()
                seconds, nbytes = read_sequential(mnt / self.relative.name)
                self.add("seq 1 GiB", "rclone webdav (full cache)", "warm", seconds=seconds, bytes=nbytes)
            shutil.rmtree(cache, ignore_errors=True)
            with mounts.rclone_webdav(mnt, url, cache, log, "--vfs-cache-mode", "full"):
                drop_caches()
                run = read_random(mnt / self.relative.name, self.where)
                time.sleep(1.0)  # let rclone's background download settle before measuring its cache
                fetched = allocated(cache)
                self.add(RANDOM, "rclone webdav (full cache)", "cold", **run.values(),
                         origin_MB=fetched / 1e6, origin_x_file=fetched / self.size)
            shutil.rmtree(cache, ignore_errors=True)

    def xrootdfs(self) -> None:
        if shutil.which("xrootdfs") is None:
            self.skip("xrootdfs", "not installed")
            return
        mnt = self.work / "mnt-xrootdfs"
        root = f"{self.distance.url('origin_root')}//{self.relative.parent}/"
        for _ in range(self.peer_runs):
            with mounts.xrootdfs(mnt, root, self.work / "xrootdfs.log"):
                path = mnt / self.relative.name
                drop_caches()
                seconds, nbytes = read_sequential(path)
                self.add("seq 1 GiB", "xrootdfs", "cold", seconds=seconds, bytes=nbytes)
                drop_caches()
                self.add(RANDOM, "xrootdfs", "cold", **read_random(path, self.where).values())

    def davfs2(self) -> None:
        if shutil.which("mount.davfs") is None:
            self.skip("davfs2", "not installed")
            return
        self.skip("davfs2", "readdir fails with EINVAL on this kernel and it downloads the whole file on every "
                  "open (../shared/notes/storage-stack.md, re-checked there on 2026-11-24); not a usable peer")

    def passthrough(self) -> None:
        mnt = self.work / "mnt-passthrough"
        for _ in range(self.n):
            with mounts.passthrough(mnt, self.lk.rse_dir, self.work / "passthrough.log"):
                path = mnt / self.relative
                drop_caches()
                seconds, nbytes = read_sequential(path)
                self.add("seq 1 GiB", "pyfuse3 passthrough (local disk)", "cold", seconds=seconds, bytes=nbytes)
                seconds, nbytes = read_sequential(path)
                self.add("seq 1 GiB", "pyfuse3 passthrough (local disk)", "hot", seconds=seconds, bytes=nbytes)
                for readers in PARALLEL_READERS:
                    drop_caches()
                    self.add(f"{readers} readers", "pyfuse3 passthrough (local disk)", "cold",
                             seconds=parallel(path, self.size, readers), bytes=self.size)
            drop_caches()
            seconds, nbytes = read_sequential(self.lk.replica_file(self.did))
            self.add("seq 1 GiB", "local disk (no FUSE)", "cold", seconds=seconds, bytes=nbytes)

    def passthrough_random(self) -> None:
        """The floor of a random read through any pyfuse3 + trio daemon: the random reads through a fresh
        passthrough mount of the local file, whose pages (those the reads touch) are read into the page
        cache first, after the caches were dropped: what remains is the FUSE round trip, not the disk.
        The same reads of the local file itself give the syscall without FUSE."""
        mnt = self.work / "mnt-passthrough"
        local = self.lk.replica_file(self.did)
        for _ in range(self.n):
            drop_caches()
            read_random(local, self.where)  # the pages under the mount, in RAM
            bare = read_random(local, self.where)
            self.add(RANDOM, LOCAL_RANDOM, "hot", **bare.values())
            with mounts.passthrough(mnt, self.lk.rse_dir, self.work / "passthrough.log"):
                run = read_random(mnt / self.relative, self.where)
            self.add(RANDOM, PASSTHROUGH_RANDOM, "cold", **run.values(),
                     fuse_us_per_read=run.us_per_read - bare.us_per_read)

    def xcache(self) -> None:
        for i in range(self.n):
            restart_xcache(self.lk)
            drop_caches()
            c = curl(self.xcache_url)
            self.add("seq 1 GiB via XCache", "curl XCache → /dev/null", "cold", seconds=c["seconds"], bytes=c["bytes"])
            drop_caches()
            c = curl(self.xcache_url)
            self.add("seq 1 GiB via XCache", "curl XCache → /dev/null", "warm", seconds=c["seconds"], bytes=c["bytes"])
            restart_xcache(self.lk)
            cache = self.work / f"cache-xc-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            with self.dlfs(cache, f"xcache={self.lk.url('xcache_http')}") as m:
                path = self.dlfs_path(m)
                os.stat(path)
                drop_caches()
                seconds, nbytes = read_sequential(path)
                self.add("seq 1 GiB via XCache", "datalakefs", "cold", seconds=seconds, bytes=nbytes)
            shutil.rmtree(cache, ignore_errors=True)

    def goals(self) -> None:
        def rate(workload: str, tool: str, state: str) -> float | None:
            seconds = self.med(workload, tool, state)
            return None if seconds is None else mb_s(self.size, seconds)

        g = self.result.goals
        seq = "seq 1 GiB"
        for readers in PARALLEL_READERS:
            ours, curl = rate(f"{readers} readers", "datalakefs", "cold"), rate(f"{readers} readers",
                                                                               f"curl origin ×{readers} ranges", "cold")
            ceiling = rate(f"{readers} readers", "pyfuse3 passthrough (local disk)", "cold")
            if ours and curl:
                g.append(Goal(f"{readers} parallel readers ≥ 0.7× curl ×{readers} ranges", ours / curl, 0.7, ">=",
                              f"{ours:,.0f} vs {curl:,.0f} MB/s"
                              + (f"; {ours / ceiling:.2f}× the minimal pyfuse3 passthrough's {readers} readers of "
                                 f"the local file ({ceiling:,.0f} MB/s) in this run" if ceiling else ""),
                              reference=f"curl ×{readers} ranges"))
        dl_cold = rate(seq, "datalakefs", "cold")
        curl_cold = rate(seq, "curl origin → /dev/null", "cold")
        peers = [r for r in (rate(seq, "rclone webdav (full cache)", "cold"), rate(seq, "xrootdfs", "cold")) if r]
        curl_file = rate(seq, "curl origin → cache disk", "cold")
        if dl_cold and curl_cold:
            g.append(Goal("cold sequential ≥ 0.9× curl from the origin", dl_cold / curl_cold, 0.9, ">=",
                          f"{dl_cold:,.0f} vs {curl_cold:,.0f} MB/s"
                          + (f"; {dl_cold / curl_file:.2f}× curl writing to the cache disk" if curl_file else ""),
                          reference="curl from the origin"))
        if dl_cold and peers:
            g.append(Goal("cold sequential ≥ 2× the best peer", dl_cold / max(peers), 2.0, ">=",
                          f"best peer {max(peers):,.0f} MB/s", reference="best peer"))
        xc_dl = rate("seq 1 GiB via XCache", "datalakefs", "cold")
        xc_curl = rate("seq 1 GiB via XCache", "curl XCache → /dev/null", "cold")
        if xc_dl and xc_curl:
            g.append(Goal("through XCache ≥ 0.95× curl through XCache", xc_dl / xc_curl, 0.95, ">=",
                          f"{xc_dl:,.0f} vs {xc_curl:,.0f} MB/s", reference="curl through XCache"))
        ceiling = {"warm": rate(seq, "pyfuse3 passthrough (local disk)", "cold"),
                   "hot": rate(seq, "pyfuse3 passthrough (local disk)", "hot")}
        for state, limit in (("warm", 1500.0), ("hot", 5000.0)):
            measured = rate(seq, "datalakefs", state)
            if measured:
                top = ceiling[state]
                detail = (f"{measured / top:.2f}× the minimal pyfuse3 passthrough's "
                          f"{'cold' if state == 'warm' else 'hot'} read of the local file ({top:,.0f} MB/s) "
                          "in this run") if top else ""
                g.append(Goal(f"{state} sequential ≥ {limit / 1000:g} GB/s", measured, limit, ">=", detail))
        dl_rand = self.med(RANDOM, "datalakefs", "cold")
        raw_rand = self.med(RANDOM, RAW_GETS, "cold")
        if dl_rand and raw_rand:
            g.append(Goal("random 4 KiB cold ≤ 1.15× raw Range GETs", dl_rand / raw_rand, 1.15, "<=",
                          random_detail(dl_rand, raw_rand, self.med(RANDOM, PASSTHROUGH_RANDOM, "cold"),
                                        self.med(RANDOM, "xrootdfs", "cold"),
                                        self.med(RANDOM, "datalakefs", "cold", "first_read_ms")),
                          reference="raw Range GETs"))
        share = self.med(RANDOM, "datalakefs", "cold", "origin_x_file")
        if share is not None:
            g.append(Goal("random 4 KiB cold: origin bytes ≤ 0.25× file size", share, 0.25, "<="))
        cpu = self.med(seq, "datalakefs", "cold", "cpu_s_per_GiB")
        if cpu is not None:
            g.append(Goal("daemon CPU ≤ 1 s per GiB cold", cpu, 1.0, "<="))

    def run(self) -> SuiteResult:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("references", self.references),
            ("datalakefs", lambda: self.datalakefs("", *self.direct)),
            ("datalakefs random", self.datalakefs_random),
            ("rclone", self.rclone),
            ("xrootdfs", self.xrootdfs),
            ("davfs2", self.davfs2),
            ("passthrough", self.passthrough),
            ("passthrough random", self.passthrough_random),
            ("xcache", self.xcache),
        ]
        only = set(filter(None, os.environ.get("BENCH_READ_STEPS", "").split(",")))
        for name, step in steps:
            if only and name not in only:
                continue
            if self.distance.rtt_ms and name in NEAR_ONLY_STEPS:
                continue
            print(f"[read] {name}", flush=True)
            try:
                step()
            except Exception as exc:  # one broken tool must not lose the others
                self.result.notes.append(f"{name}: failed: {exc}")
                print(f"[read] {name} failed: {exc!r}", flush=True)
        self.rows()
        self.goals()
        self.result.notes.append(
            f"{rtt_label(self.distance.rtt_ms)}: medians of {self.n} runs; MB/s = 10^6 B/s; file {self.did} "
            f"({self.size:,} bytes); origin {self.origin_url}; datalakefs reads with "
            f"{','.join(self.direct)} except in the XCache rows")
        return self.result


def run() -> SuiteResult:
    """The suite at each ``BENCH_RTT_MS``; rows and goals beyond 0 ms say their RTT."""
    result = SuiteResult(NAME, context=context())
    for rtt_ms in rtts_ms():
        with at_distance(rtt_ms, WORK / f"{NAME}-distance") as distance:
            part = Suite(distance).run()
        suffix = f", {rtt_label(rtt_ms)}"
        result.rows += [dataclasses.replace(row, workload=row.workload + suffix) for row in part.rows]
        result.goals += [dataclasses.replace(goal, name=goal.name + suffix) for goal in part.goals]
        result.notes += part.notes
    result.notes.append(f"command: `python -m bench.read` (BENCH_RUNS={runs()}, BENCH_RTT_MS="
                        f"{','.join(f'{r:g}' for r in rtts_ms())}); beyond 0 ms the origin is behind the latency "
                        f"proxy (bench/distance.py) and the steps {', '.join(NEAR_ONLY_STEPS)} are left out")
    write_suite(result)
    return result


if __name__ == "__main__":
    run()
