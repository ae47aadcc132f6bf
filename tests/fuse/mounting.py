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
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from datalakefs.fuse.session import FSTYPE, is_stale, mounted_fstype, unmount, wait_gone
from tests.fuse.users import TestUser


def kill_and_unmount(process: subprocess.Popen[Any], mountpoint: Path) -> None:
    """Cleanup after a FUSE process a test started: kill it if it still runs, and lazily unmount what it
    left mounted."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
    if mounted_fstype(str(mountpoint)) is not None:
        unmount(str(mountpoint), lazy=True)


def datalakefs(*args: str, timeout: float = 180, env: dict[str, str] | None = None,
               user: TestUser | None = None) -> subprocess.CompletedProcess[str]:
    """``datalakefs ARGS``; as ``user`` when given (``env`` then adds to that user's environment)."""
    argv = [sys.executable, "-m", "datalakefs", *args]
    if user is not None:
        return user.run(argv, env=env, timeout=timeout)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=env)



@contextlib.contextmanager
def fstab_mounted(config: Path, base: Path, options: str) -> Iterator[Mount]:
    """A mount made the way mount(8) makes one for the fstab line ``datalakefs <base>/fstab datalakefs
    OPTIONS,config=CONFIG,...`` (through ``mount.datalakefs``), undone afterwards."""
    mountpoint = base / "fstab"
    mountpoint.mkdir()
    helper = Path(sys.executable).with_name("mount.datalakefs")
    done = subprocess.run([str(helper), "datalakefs", str(mountpoint), "-o",
                           f"{options},config={config},cache_dir={base / 'c'},state_dir={base / 's'}"],
                          capture_output=True, text=True, timeout=120, check=False)
    mount = Mount(mountpoint, config, f"state_dir={base / 's'}")
    try:
        assert done.returncode == 0, done.stderr
        yield mount
    finally:
        mount.stop()


class Mount:
    def __init__(self, mountpoint: Path, config: Path, *options: str, env: dict[str, str] | None = None,
                 user: TestUser | None = None) -> None:
        """``user``: mount (and umount, and read the status) as this unprivileged user."""
        self.mountpoint = mountpoint
        self.config = config
        self.options = options
        self.env = env
        self.user = user
        mountpoint.mkdir(parents=True, exist_ok=True)
        if user is not None:
            user.give(mountpoint, 0o755)

    def _args(self) -> list[str]:
        args = ["--config", str(self.config)]
        for option in self.options:
            args += ["-o", option]
        return args

    def start(self) -> subprocess.CompletedProcess[str]:
        done = datalakefs("mount", str(self.mountpoint), *self._args(), env=self.env, user=self.user)
        if done.returncode != 0:
            raise AssertionError(f"mount failed: {done.stdout}\n{done.stderr}")
        return done

    def status(self) -> dict[str, Any]:
        path = self.mountpoint / ".datalakefs" / "status.json"
        # without allow_other, only the user who mounted may look into the mount (root neither)
        text = path.read_text() if self.user is None else self.user.run(["cat", str(path)], check=True).stdout
        data: dict[str, Any] = json.loads(text)
        return data

    @property
    def pid(self) -> int:
        return int(self.status()["pid"])

    def daemon_log(self) -> str:
        """What the daemons of this mount's state_dir logged."""
        state_dir = next(o.partition("=")[2] for o in self.options if o.startswith("state_dir="))
        return "".join(log.read_text() for log in sorted((Path(state_dir) / "logs").glob("*.log")))

    def is_mounted(self) -> bool:
        """Whether the lake is mounted here (not whatever it may sit on, such as a volume)."""
        return mounted_fstype(os.path.abspath(self.mountpoint)) == FSTYPE

    def umount(self) -> subprocess.CompletedProcess[str]:
        """``datalakefs umount`` of this mount and nothing else (no fallback): its result to check."""
        return datalakefs("umount", str(self.mountpoint), *self._args(), env=self.env, user=self.user)

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
