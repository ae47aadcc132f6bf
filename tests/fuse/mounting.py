"""A datalakefs mount made with the real command line, always undone.

Tests never leave a mount behind: :meth:`Mount.stop` unmounts through ``datalakefs umount`` and falls
back to a lazy ``fusermount3 -uz`` (and a SIGKILL of the daemon) when that fails. That is cleanup, so
it proves nothing: a test of unmounting calls :meth:`Mount.umount` and checks its result itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from datalakefs.fuse.session import is_stale, mounted_fstype, wait_gone


def datalakefs(*args: str, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "datalakefs", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)


class Mount:
    def __init__(self, mountpoint: Path, config: Path, *options: str, env: dict[str, str] | None = None) -> None:
        self.mountpoint = mountpoint
        self.config = config
        self.options = options
        self.env = env
        mountpoint.mkdir(parents=True, exist_ok=True)

    def _args(self) -> list[str]:
        args = ["--config", str(self.config)]
        for option in self.options:
            args += ["-o", option]
        return args

    def start(self) -> subprocess.CompletedProcess[str]:
        done = datalakefs("mount", str(self.mountpoint), *self._args(), env=self.env)
        if done.returncode != 0:
            raise AssertionError(f"mount failed: {done.stdout}\n{done.stderr}")
        return done

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.mountpoint / ".datalakefs" / "status.json").read_text())
        return data

    @property
    def pid(self) -> int:
        return int(self.status()["pid"])

    def daemon_log(self) -> str:
        """What the daemons of this mount's state_dir logged."""
        state_dir = next(o.partition("=")[2] for o in self.options if o.startswith("state_dir="))
        return "".join(log.read_text() for log in sorted((Path(state_dir) / "logs").glob("*.log")))

    def is_mounted(self) -> bool:
        return mounted_fstype(os.path.abspath(self.mountpoint)) is not None

    def umount(self) -> subprocess.CompletedProcess[str]:
        """``datalakefs umount`` of this mount and nothing else (no fallback): its result to check."""
        return datalakefs("umount", str(self.mountpoint), *self._args(), env=self.env)

    def stop(self) -> None:
        """Cleanup: unmount whatever it takes (see the module doc); never the subject of a test."""
        pid = None
        with contextlib.suppress(Exception):
            pid = self.pid
        if self.is_mounted() and not is_stale(str(self.mountpoint)):
            self.umount()
        if self.is_mounted():
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False, capture_output=True)
        if pid is not None and not wait_gone(pid, timeout=10):
            os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Mount:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
