"""The lake's processes: how they are described, started as whom, recorded by PID and stopped.

Invariants:

* a process is recorded in ``run/<service>.pid`` (PID and kernel start time, so a reused PID is
  never mistaken for ours) the moment it is spawned; ``down`` stops exactly those PIDs and what is
  left of their process groups, never anything found by name;
* PostgreSQL and XRootD run as dedicated system users when the lake is started as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import string
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from datalakefs.demo.layout import ASSETS, PORT_OFFSETS, DemoError, Layout, ProgressFn


@dataclass(frozen=True, slots=True)
class Site:
    """What a service module needs to configure and start its processes."""

    layout: Layout
    ports: Mapping[str, int]
    run_as: RunAs

    def spawn(
        self, name: str, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], user: str | None = None
    ) -> ProcessRecord:
        """Start ``argv`` in its own session, logging to log/<name>.out, and record its PID at once."""
        log = self.layout.log / f"{name}.out"
        ident = Identity.of(user)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
                user=ident.user,
                group=ident.group,
                extra_groups=ident.extra_groups,
            )
        start_time = start_time_of(proc.pid)
        # keep the Popen alive until exit: the child outlives us, and dropping it would only warn
        CHILDREN.append(proc)
        rec = ProcessRecord(pid=proc.pid, start_time=start_time if start_time is not None else -1)
        write_atomic(self.layout.pid_file(name), json.dumps(rec.to_json()) + "\n")
        return rec

    def spawn_script(
        self, name: str, script: str, env: Mapping[str, str] | None = None, **options: object
    ) -> None:
        """Start ``script`` of the lake's lib/ with the server venv's Python, in run/; each of
        ``options`` becomes ``--name value`` (``_`` in the name as ``-``)."""
        layout = self.layout
        args = [part for key, value in options.items() for part in (f"--{key.replace('_', '-')}", str(value))]
        argv = [str(layout.venv / "bin" / "python"), str(layout.lib / script), *args]
        self.spawn(name, argv, cwd=layout.run, env=clean_env() if env is None else env)

    def configure(self, name: str, template: str, **values: object) -> None:
        """Write etc/``name`` from the asset ``template`` with ``values`` filled in."""
        write_atomic(self.layout.etc / name, render(template, **values))


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A process of the lake: its ports, how its health is probed, how it is started and stopped."""

    name: str
    description: str
    ports: tuple[str, ...]
    start: Callable[[Site, ProgressFn], None]
    http_path: str | None = None
    heartbeat: bool = False
    stop_signal: signal.Signals = signal.SIGTERM
    depends_on: tuple[str, ...] = ()


def service_ports(spec: ServiceSpec, port_base: int) -> dict[str, int]:
    return {key: port_base + PORT_OFFSETS[key] for key in spec.ports}



@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A process we started: PID plus its kernel start time (guards against PID reuse)."""

    pid: int
    start_time: int

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], pgrp [2], starttime [19])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def start_time_of(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return None if fields is None else int(fields[19])


def is_alive(record: ProcessRecord) -> bool:
    """True while the recorded process runs (a zombie or a reused PID counts as gone)."""
    fields = _proc_stat(record.pid)
    if fields is None or int(fields[19]) != record.start_time:
        return False
    if fields[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(record.pid, os.WNOHANG)
        return False
    return True


def read_record(path: Path) -> ProcessRecord | None:
    try:
        data = json.loads(path.read_text())
        return ProcessRecord(pid=int(data["pid"]), start_time=int(data["start_time"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _group_members(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid`` (the leftovers of a session we created)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_records(records: Mapping[str, tuple[ProcessRecord, signal.Signals]], timeout: float) -> list[str]:
    """Signal every live recorded process, wait for all, then SIGKILL what is left (and group leftovers).

    Returns the names of the processes that were alive.
    """
    live = {name: rec for name, (rec, sig) in records.items() if is_alive(rec)}
    for name, rec in live.items():
        _signal(rec.pid, records[name][1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_alive(rec) for rec in live.values()):
        time.sleep(0.05)
    for rec in live.values():
        if is_alive(rec):
            _signal(rec.pid, signal.SIGKILL)
        for pid in _group_members(rec.pid):
            _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(is_alive(r) or _group_members(r.pid) for r in live.values()):
        time.sleep(0.05)
    return list(live)




@dataclass(frozen=True, slots=True)
class RunAs:
    """Who runs PostgreSQL and XRootD: dedicated system users when we are root, else ourselves."""

    postgres: str | None
    xrootd: str | None

    @classmethod
    def detect(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls(postgres=None, xrootd=None)
        return cls(postgres="postgres", xrootd="xrootd")


def user_ids(user: str) -> tuple[int, int, set[int]]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise DemoError(f"system user {user!r} does not exist: run scripts/install-system-packages.sh") from None
    return entry.pw_uid, entry.pw_gid, set(os.getgrouplist(user, entry.pw_gid))


def _can_enter(path: Path, uid: int, groups: set[int]) -> bool:
    st = path.stat()
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def check_traversable(root: Path, users: Sequence[str]) -> None:
    """Fail clearly unless every existing directory from / down to ``root`` can be entered by ``users``."""
    chain = [p for p in (root, *root.parents) if p.exists()]
    for user in users:
        uid, _gid, groups = user_ids(user)
        for directory in reversed(chain):
            if not _can_enter(directory, uid, groups):
                mode = stat.S_IMODE(directory.stat().st_mode)
                raise DemoError(
                    f"user {user!r} cannot enter {directory} (mode {mode:04o}), which holds the state "
                    f"directory {root}: PostgreSQL and XRootD run as {', '.join(users)} and need every "
                    f"directory above the state directory to be traversable (chmod o+x {directory}), "
                    "or choose a state directory elsewhere (for example under /var/tmp)"
                )


def chown(path: Path, user: str | None) -> None:
    if user is not None:
        uid, gid, _ = user_ids(user)
        os.chown(path, uid, gid)



def require(executable: str) -> str:
    found = shutil.which(executable) or shutil.which(executable, path="/usr/sbin:/sbin:/usr/bin")
    if found is None:
        raise DemoError(f"{executable} is not installed: run scripts/install-system-packages.sh")
    return found


def clean_env(*, keep_proxies: bool = False, **extra: str) -> dict[str, str]:
    """The caller's environment without what would leak into the lake's processes.

    Dropped: venv and Python settings, rucio and X509 settings, and HTTP proxies unless
    ``keep_proxies`` (pip needs them; everything the lake's own processes talk to is on loopback).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RUCIO_", "X509_", "PYTHON", "DATALAKEFS_"))
        and k != "VIRTUAL_ENV"
        and (keep_proxies or not k.lower().endswith("_proxy"))
    }
    env.update(extra)
    return env


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"



CHILDREN: list[subprocess.Popen[bytes]] = []


@dataclass(frozen=True, slots=True)
class Identity:
    """Popen's user/group/extra_groups: a system user when we are root, else unchanged (all None)."""

    user: int | None = None
    group: int | None = None
    extra_groups: tuple[int, ...] | None = None

    @classmethod
    def of(cls, user: str | None) -> Identity:
        if user is None:
            return cls()
        uid, gid, _ = user_ids(user)
        return cls(user=uid, group=gid, extra_groups=())


def mount_answers(mountpoint: Path, timeout: float = 5.0) -> bool:
    """True when a stat through the mount returns in time (a hung daemon blocks it indefinitely)."""
    try:
        subprocess.run(["stat", str(mountpoint)], capture_output=True, timeout=timeout, check=True)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError):
        return False
    return True


def datalakefs_executable() -> str | None:
    """The `datalakefs` command of this installation (next to this Python first), None if absent."""
    beside = Path(sys.executable).with_name("datalakefs")
    return str(beside) if beside.exists() else shutil.which("datalakefs")



def render(template: str, **values: object) -> str:
    return string.Template((ASSETS / template).read_text()).substitute({k: str(v) for k, v in values.items()})



def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mounted(path: Path) -> bool:
    target = os.path.abspath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except FileNotFoundError:
        return False
    return any(_unescape_mountinfo(line.split()[4]) == target for line in lines)
