"""What one cold random 4 KiB read costs a FUSE daemon, counted: datalakefs against its floor, the pyfuse3
passthrough of the local file (``bench/passthrough.py``, the pages the reads touch in RAM).

``python -m bench.readcost [READS]`` (root; default 500 reads) mounts each daemon in the foreground under
a probe, reads the file at the read suite's random offsets (``bench.read.offsets``; the first 20 only to
open the file, resolve its replicas and connect), and prints per read:

* **syscalls** of every daemon thread, by name (``strace -c -f -p``, attached for the first READS reads);
* **context switches** of the daemon's threads (``/proc/<pid>/task/*/status``), voluntary / not;
* **trio task steps** and **scheduler passes** (each pass one ``epoll_wait``), from a trio instrument
  the probe adds to the daemon's ``trio.run``;
* **daemon CPU** µs (utime + stime) and wall µs, for the next READS reads, without strace;
* **Python calls** on the trio thread (cProfile, for a third READS reads): ours (``datalakefs/``), trio's,
  the rest.

Counts are valid on a loaded machine; the CPU and wall figures are not (they move 2–3× with the load).
``python -m bench.readcost probe MODULE ARGS...`` is the probe itself: it runs ``python -m MODULE ARGS``
with the instrument, dumps its counts to ``$READCOST_OUT.json`` on SIGUSR2 and toggles the profile
(``$READCOST_OUT.prof``) on SIGUSR1.
"""

from __future__ import annotations

import collections
import cProfile
import json
import os
import pstats
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import trio

from bench import read
from bench.env import WORK, BenchError, file_path, lake, stop
from datalakefs.fuse.session import mounted_fstype

WARM_READS = 20


# ---- the probe, inside the daemon ------------------------------------------------------------------


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0
        self.passes = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1


def probe(module: str, args: list[str]) -> None:
    out = os.environ["READCOST_OUT"]
    steps = _Steps()
    profile: list[cProfile.Profile] = []

    def dump(signum: int, frame: FrameType | None) -> None:
        Path(out + ".json.tmp").write_text(json.dumps({"steps": steps.steps, "passes": steps.passes}))
        os.replace(out + ".json.tmp", out + ".json")

    def toggle_profile(signum: int, frame: FrameType | None) -> None:  # runs on the main (trio) thread
        if profile:
            profile[0].disable()
            profile.pop().dump_stats(out + ".prof")
        else:
            profile.append(cProfile.Profile())
            profile[0].enable()
            Path(out + ".profiling").touch()

    signal.signal(signal.SIGUSR2, dump)
    signal.signal(signal.SIGUSR1, toggle_profile)
    run = trio.run

    def run_counted(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), steps]
        return run(*args, **kwargs)

    trio.run = run_counted  # type: ignore[assignment]  # the daemon calls trio.run from its own module
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# ---- the driver ----------------------------------------------------------------------------------


def _context_switches(pid: int) -> tuple[int, int]:
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "voluntary_ctxt_switches":
                voluntary += int(value)
            elif name == "nonvoluntary_ctxt_switches":
                involuntary += int(value)
    return voluntary, involuntary


def _cpu_ns(pid: int) -> int:
    """CPU time of the process's threads so far, in ns (``schedstat``: finer than ``stat``'s clock ticks)."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir())


def strace_counts(path: Path) -> dict[str, int]:
    """``strace -c`` output: calls per syscall (errors included)."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def _python_calls(path: Path) -> collections.Counter[str]:
    calls: collections.Counter[str] = collections.Counter()
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    for (filename, _line, _name), (_primitive, ncalls, *_rest) in stats.items():
        owner = ("ours" if f"{os.sep}datalakefs{os.sep}" in filename else "trio" if f"{os.sep}trio{os.sep}" in filename
                 else "readcost" if filename.endswith("readcost.py") else "other")
        calls[owner] += ncalls
    del calls["readcost"]
    return calls


class Daemon:
    """One FUSE daemon under the probe, mounted at ``mountpoint``; ``path`` is the big file in it."""

    def __init__(self, name: str, argv: list[str], mountpoint: Path, path: Path, out: Path) -> None:
        self.name, self.mountpoint, self.path, self.out = name, mountpoint, path, out
        env = {**lake().client_env(), "READCOST_OUT": str(out)}
        mountpoint.mkdir(parents=True, exist_ok=True)
        with open(f"{out}.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bench.readcost", "probe", *argv], env=env,
                                         stdout=log, stderr=log, cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 120
        while mounted_fstype(os.path.realpath(mountpoint)) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{name} did not mount; see {out}.log")
            time.sleep(0.05)

    def _signal(self, signum: int, done: Path) -> None:
        """Send ``signum`` and wait until the probe has written ``done``."""
        done.unlink(missing_ok=True)
        os.kill(self.proc.pid, signum)
        deadline = time.monotonic() + 10
        while not done.exists():
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not answer signal {signum}")
            time.sleep(0.01)

    def counts(self) -> dict[str, int]:
        result = Path(f"{self.out}.json")
        self._signal(signal.SIGUSR2, result)
        data: dict[str, int] = json.loads(result.read_text())
        return data

    def toggle_profile(self, done: Path) -> None:
        self._signal(signal.SIGUSR1, done)

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, check=False)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            stop(self.proc)


def _reads(fd: int, where: list[int]) -> float:
    begin = time.perf_counter()
    for offset in where:
        if len(os.pread(fd, read.PAGE, offset)) != read.PAGE:
            raise BenchError(f"short read at {offset}")
    return time.perf_counter() - begin


def measure(daemon: Daemon, where: list[int], reads: int) -> dict[str, Any]:
    counted, timed, profiled = (where[WARM_READS + k * reads: WARM_READS + (k + 1) * reads] for k in range(3))
    fd = os.open(daemon.path, os.O_RDONLY)
    try:
        _reads(fd, where[:WARM_READS])
        trace = Path(f"{daemon.out}.strace")
        strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(daemon.proc.pid), "-o", str(trace)],
                                  stderr=subprocess.PIPE, text=True)
        assert strace.stderr is not None
        strace.stderr.readline()  # "strace: Process N attached" once it traces
        _reads(fd, counted)
        strace.send_signal(signal.SIGINT)
        strace.wait(timeout=30)
        before, switches, cpu = daemon.counts(), _context_switches(daemon.proc.pid), _cpu_ns(daemon.proc.pid)
        wall = _reads(fd, timed)
        after, switched, cpu = daemon.counts(), _context_switches(daemon.proc.pid), _cpu_ns(daemon.proc.pid) - cpu
        daemon.toggle_profile(Path(f"{daemon.out}.profiling"))
        _reads(fd, profiled)
        daemon.toggle_profile(Path(f"{daemon.out}.prof"))
    finally:
        os.close(fd)
    return {
        "syscalls": {name: count / reads for name, count in strace_counts(trace).items()},
        "task steps": (after["steps"] - before["steps"]) / reads,
        "scheduler passes": (after["passes"] - before["passes"]) / reads,
        "voluntary switches": (switched[0] - switches[0]) / reads,
        "involuntary switches": (switched[1] - switches[1]) / reads,
        "CPU µs (load-dependent)": cpu / reads / 1e3,
        "wall µs (load-dependent)": wall / reads * 1e6,
        "profile": Path(f"{daemon.out}.prof"),
    }


def main(reads: int) -> None:
    lk = lake()
    did = lk.seed.big_file
    local = lk.replica_file(did)
    where = read.offsets(local.stat().st_size)
    if len(where) < WARM_READS + 3 * reads:
        raise BenchError(f"at most {(len(where) - WARM_READS) // 3} reads")
    work = WORK / "readcost"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    read.read_random(local, where)  # the passthrough's pages in RAM: its floor is FUSE, not the disk
    results: dict[str, dict[str, Any]] = {}
    mnt = work / "mnt-passthrough"
    daemon = Daemon("pyfuse3 passthrough", ["bench.passthrough", str(lk.rse_dir), str(mnt)], mnt,
                    mnt / local.relative_to(lk.rse_dir), work / "passthrough")
    try:
        results[daemon.name] = measure(daemon, where, reads)
    finally:
        daemon.close()
    mnt = work / "mnt-datalakefs"
    options = f"cache_dir={work / 'cache'},state_dir={work / 'state'}"
    daemon = Daemon("datalakefs", ["datalakefs", "mount", "--foreground", str(mnt), "--config",
                                   str(lk.status.datalakefs_config), "-o", options, "-o", "xcache=none"],
                    mnt, file_path(mnt, lk.seed.sized_dataset, did), work / "datalakefs")
    try:
        results[daemon.name] = measure(daemon, where, reads)
    finally:
        daemon.close()
    print(table(results, reads))


def table(results: dict[str, dict[str, Any]], reads: int) -> str:
    names = list(results)
    lines = [f"Per cold random 4 KiB read ({reads} reads each; `python -m bench.readcost {reads}`)", "",
             "| per read | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    syscalls = sorted({s for r in results.values() for s in r["syscalls"]},
                      key=lambda s: -max(r["syscalls"].get(s, 0) for r in results.values()))
    for name in syscalls:
        values = [r["syscalls"].get(name, 0.0) for r in results.values()]
        if max(values) >= 0.05:
            lines.append(f"| syscall {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines.append("| syscalls in all | " + " | ".join(f"{sum(r['syscalls'].values()):.2f}"
                                                      for r in results.values()) + " |")
    for key in ("task steps", "scheduler passes", "voluntary switches", "involuntary switches",
                "CPU µs (load-dependent)", "wall µs (load-dependent)"):
        lines.append(f"| {key} | " + " | ".join(f"{r[key]:.2f}" for r in results.values()) + " |")
    calls = {name: _python_calls(r["profile"]) for name, r in results.items()}
    for owner in ("ours", "trio", "other"):
        lines.append(f"| Python calls, {owner} | " + " | ".join(f"{calls[n][owner] / reads:.1f}" for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        probe(sys.argv[2], sys.argv[3:])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
