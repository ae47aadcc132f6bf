"""What the suites share: the demo lake (found through the project's own demo tooling) and its Rucio
client, timing, counts and sizes overridable by environment variables, page-cache dropping, and
per-process CPU and memory from /proc.

The lake is the one of ``$BENCH_DEMO_STATE`` (default ``.demo`` in the repository), brought up with
``datalakefs demo up --state-dir .demo [--with-100k]``. Benchmarks never hard-code a DID, port or path:
they come from :class:`Lake` (the seed's roles and the lake's status).
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datalakefs.demo.lake import Lake as DemoLake
from datalakefs.demo.seed import rse_file
from datalakefs.demo.status import LakeStatus, Seed
from datalakefs.model import DID
from datalakefs.namespace.escaping import component_for, component_for_scope

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("BENCH_WORK", "/var/tmp/datalakefs-bench"))  # mounts, caches: on local disk
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark cannot run; the message says what to do."""


@dataclass(frozen=True)
class Lake:
    status: LakeStatus
    seed: Seed

    @property
    def origin_dir(self) -> Path:
        return Path(self.status.paths["origin"])

    @property
    def rse_dir(self) -> Path:
        return Path(self.status.paths["rse"])

    def url(self, key: str) -> str:
        return self.status.urls[key]

    def replica_file(self, did: str) -> Path:
        scope, name = did.split(":", 1)
        return rse_file(self.origin_dir, scope, name)

    def origin_url(self, did: str, via: str = "origin_http") -> str:
        relative = self.replica_file(did).relative_to(self.rse_dir)
        return f"{self.url(via)}/{relative}"

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.status.env, "no_proxy": "127.0.0.1,localhost",
                "NO_PROXY": "127.0.0.1,localhost"}


@functools.cache
def lake() -> Lake:
    state = Path(os.environ.get("BENCH_DEMO_STATE", REPO / ".demo"))
    status = DemoLake(state).status()
    if not status.healthy or status.seed is None:
        raise BenchError(f"the demo lake at {state} is not up and seeded: run "
                         f"`.venv/bin/datalakefs demo up --state-dir {state} --with-100k`")
    return Lake(status, status.seed)


def collection_path(mountpoint: Path, did: str) -> Path:
    """Path of a collection DID directly under its scope directory."""
    scope, name = did.split(":", 1)
    return mountpoint / component_for_scope(scope) / component_for(DID(scope, name), scope)


def file_path(mountpoint: Path, dataset: str, file_did: str) -> Path:
    scope, name = file_did.split(":", 1)
    return collection_path(mountpoint, dataset) / component_for(DID(scope, name), dataset.split(":", 1)[0])


def drop_caches() -> None:
    """Empty the page cache (root only); dirty pages are written first."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def first_byte(path: Path, nbytes: int = 4096) -> float:
    """Seconds of ``open()`` plus the first read (``nbytes`` at offset 0) of ``path``."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, nbytes, 0)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def run_timed(argv: list[str], **kwargs: Any) -> float:
    """Seconds a command takes; raises with its stderr when it fails."""
    start = time.perf_counter()
    kwargs.setdefault("stdout", subprocess.DEVNULL)
    done = subprocess.run(argv, stderr=subprocess.PIPE, text=True, check=False, **kwargs)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return elapsed


def stop(proc: subprocess.Popen[bytes], grace: float = 5) -> None:
    """Terminate a process the bench started, killing it when it does not end within ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def median(values: list[float]) -> float:
    return statistics.median(values)


def setting(variable: str, default: int) -> int:
    """A count or size of a suite, overridable by the environment variable ``variable`` (at least 1), so
    that a quick smoke run is possible; the names are listed in the README's benchmark paragraph."""
    return max(1, int(os.environ.get(variable, str(default))))


def runs() -> int:
    """Repetitions per measurement (``BENCH_RUNS``, default 3)."""
    return setting("BENCH_RUNS", 3)


def rucio_client(**options: Any) -> Any:
    """A rucio-clients ``Client`` of the lake (rucio reads ``RUCIO_CONFIG`` once: the lake's env is set first);
    ``options`` go to ``Client`` (e.g. ``rucio_host``/``auth_host`` of a latency proxy)."""
    os.environ.update(lake().status.env)
    from rucio.client import Client

    return Client(**options)


@contextmanager
def workdir(name: str) -> Iterator[Path]:
    path = WORK / name
    path.mkdir(parents=True, exist_ok=True)
    yield path
