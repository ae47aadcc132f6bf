"""Mounts the suites make, each a context manager that always unmounts and stops its own process by PID.

* :func:`datalakefs` — the real command line (``datalakefs mount``, detached), the demo lake's config
  plus ``-o`` overrides; the daemon's PID comes from its status.json.
* :func:`fuse_process` — any FUSE program that stays in the foreground (rclone, xrootdfs, the
  passthrough ceiling); ready when the mount shows in /proc/self/mountinfo.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.env import BenchError, lake, stop
from datalakefs.fuse.session import mounted_fstype, wait_gone


def _is_mounted(mountpoint: Path) -> bool:
    return mounted_fstype(os.path.realpath(mountpoint)) is not None


def _unmount(mountpoint: Path) -> None:
    if not _is_mounted(mountpoint):
        return
    done = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
    if done.returncode != 0:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
    if _is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, check=False)


def _wait_gone(pid: int, timeout: float) -> None:
    if not wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class DatalakefsMount:
    mountpoint: Path
    pid: int

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.mountpoint / ".datalakefs" / "status.json").read_text())
        return data


@contextlib.contextmanager
def datalakefs(mountpoint: Path, cache_dir: Path, *options: str) -> Iterator[DatalakefsMount]:
    """A fresh datalakefs mount of the demo lake (``-o`` options override the lake's config)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    state_dir = cache_dir.parent / f"{cache_dir.name}-state"
    args = ["--config", str(lake().status.datalakefs_config), "-o", f"cache_dir={cache_dir},state_dir={state_dir}"]
    for option in options:
        args += ["-o", option]
    env = lake().client_env()
    done = subprocess.run([sys.executable, "-m", "datalakefs", "mount", str(mountpoint), *args],
                          capture_output=True, text=True, env=env, check=False, timeout=180)
    if done.returncode != 0:
        raise BenchError(f"datalakefs mount failed: {done.stdout}{done.stderr}")
    pid = -1
    try:
        mount = DatalakefsMount(mountpoint, 0)
        pid = int(mount.status()["pid"])
        mount.pid = pid
        yield mount
    finally:
        subprocess.run([sys.executable, "-m", "datalakefs", "umount", str(mountpoint), *args],
                       capture_output=True, env=env, check=False, timeout=120)
        _unmount(mountpoint)
        if pid > 0:
            _wait_gone(pid, 20)


@contextlib.contextmanager
def fuse_process(argv: Sequence[str], mountpoint: Path, *, log: Path, ready_timeout: float = 30,
                 env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a foreground FUSE program until its mount appears; unmount and stop it afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if _is_mounted(mountpoint):
        raise BenchError(f"{mountpoint} is already mounted")
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + ready_timeout
        while not _is_mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{argv[0]} did not mount {mountpoint}; see {log}:\n"
                                 + log.read_text(errors="replace")[-800:])
            time.sleep(0.05)
        yield proc
    finally:
        _unmount(mountpoint)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            stop(proc)


def rclone_webdav(mountpoint: Path, url: str, cache_dir: Path, log: Path,
                  *extra: str) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """rclone mount of a WebDAV URL (an on-the-fly remote, no config file), read-only."""
    argv = ["rclone", "mount", ":webdav:", str(mountpoint), "--webdav-url", url, "--webdav-vendor", "other",
            "--read-only", "--cache-dir", str(cache_dir), "--config", "/dev/null", *extra]
    return fuse_process(argv, mountpoint, log=log)


def xrootdfs(mountpoint: Path, root_url: str, log: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return fuse_process(["xrootdfs", str(mountpoint), "-f", "-o", f"rdr={root_url}"], mountpoint, log=log)


def passthrough(
    mountpoint: Path, source: Path, log: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return fuse_process([sys.executable, "-m", "bench.passthrough", str(source), str(mountpoint)], mountpoint,
                        log=log)
