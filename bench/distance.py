"""The origin storage and the Rucio server at a chosen round-trip time (``BENCH_RTT_MS``, e.g. ``0,30``).

At 0 ms everything talks to the lake directly. At more, :func:`at_distance` starts the demo's latency
proxy (``python -m datalakefs.demo.latency``) in front of the origin's HTTP and root:// ports, the
WebDAV server (nginx, what rclone lists in the listing suite) and the Rucio server, and says how each
tool reaches them: curl, rclone, xrootdfs and rucio-clients get the proxies' URLs; a datalakefs mount
gets a copy of the lake's rucio.cfg whose ``rucio_host``/``auth_host`` are the Rucio proxy, and
``xcache=<origin proxy>`` with ``xcache_mode=swap`` (the replica's host:port swapped for the proxy's:
reads go through it, by the daemon's public option for a fixed-origin cache).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bench.env import BenchError, lake, stop
from datalakefs.demo.probes import free_port, wait_listening

PROXIED = ("origin_http", "origin_root", "dav_http", "rucio")  # the lake's URL keys a workload reaches through a proxy


def rtts_ms() -> list[float]:
    """The round-trip times to run at, from ``BENCH_RTT_MS`` (comma-separated milliseconds, default 0)."""
    values = [float(v) for v in os.environ.get("BENCH_RTT_MS", "0").split(",") if v.strip()]
    if not values or any(v < 0 for v in values):
        raise BenchError(f"BENCH_RTT_MS must list round-trip times ≥ 0 in ms, not {os.environ['BENCH_RTT_MS']!r}")
    return values


def rtt_label(rtt_ms: float) -> str:
    return f"{rtt_ms:g} ms RTT"


@dataclass(frozen=True)
class Distance:
    """How the tools reach the lake at ``rtt_ms``: URLs by the lake's keys, and the datalakefs mount options."""

    rtt_ms: float
    urls: dict[str, str] = field(default_factory=dict)
    mount_options: tuple[str, ...] = ()

    def url(self, key: str) -> str:
        return self.urls.get(key) or lake().url(key)

    def origin_url(self, did: str) -> str:
        relative = lake().replica_file(did).relative_to(lake().rse_dir)
        return f"{self.url('origin_http')}/{relative}"


def proxied_rucio_config(source: Path, rucio_url: str, target: Path) -> Path:
    """A copy of the rucio.cfg ``source`` whose catalogue and auth hosts are ``rucio_url``."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(source)
    parser["client"]["rucio_host"] = rucio_url
    parser["client"]["auth_host"] = rucio_url
    with open(target, "w") as fh:
        parser.write(fh)
    return target


@contextlib.contextmanager
def at_distance(rtt_ms: float, work: Path) -> Iterator[Distance]:
    """The lake at ``rtt_ms``: proxies started (and stopped by PID afterwards) when ``rtt_ms`` > 0."""
    if rtt_ms == 0:
        yield Distance(0)
        return
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    work.mkdir(parents=True, exist_ok=True)
    try:
        for key in PROXIED:
            target = urlsplit(lake().url(key))
            port = free_port()
            with open(work / f"latency-{key}.log", "wb") as log:  # why a proxy died, if one does
                proc = subprocess.Popen([sys.executable, "-m", "datalakefs.demo.latency", "--listen", str(port),
                                         "--target", f"{target.hostname}:{target.port}", "--rtt-ms", f"{rtt_ms:g}"],
                                        stdout=log, stderr=subprocess.STDOUT)
            procs.append(proc)
            try:
                wait_listening(port, proc)
            except RuntimeError as exc:
                raise BenchError(f"the latency proxy did not start: {exc}") from exc
            urls[key] = f"{target.scheme}://127.0.0.1:{port}"
        config = proxied_rucio_config(lake().status.datalakefs_config.parent / "rucio-client.cfg", urls["rucio"],
                                      work / f"rucio-{rtt_ms:g}ms.cfg")
        yield Distance(rtt_ms, urls, (f"rucio_config={config}", f"xcache={urls['origin_http']}", "xcache_mode=swap"))
    finally:
        for proc in procs:
            stop(proc)
