"""The processes of the local data lake: state directory layout, port table, start, stop, health.

Every service listens on 127.0.0.1 at ``port_base + offset`` (xrootd cannot bind one address: it
listens on ``*`` and accepts loopback clients only, ``xrd.allow host localhost``):

    offset  port key          service     what
    ------  ----------------  ----------  -------------------------------------------------------
       0    rucio             rucio       Rucio REST server (gunicorn), http
       1    dav_https         dav         nginx WebDAV, https (SCRATCH; LAKE-ORIGIN's write door)
       2    fts               fts         FTS3-REST test shim, http
       3    dav_http          dav         the same nginx, plain http
       4    postgres          postgres    PostgreSQL (private cluster)
       5    rucio_https       rucio-tls   the Rucio server app again, https (a second gunicorn): it
                                          verifies client certificates and proxies against the demo
                                          CA, for rucio's x509 and x509_proxy auth
      10    origin_root       origin      XRootD origin of LAKE-ORIGIN, root://
      11    origin_http       origin      the same origin, http (XrdHttp)
      12    xcache_root       xcache      XCache in front of the origin (fixed origin), root://
      13    xcache_http       xcache      the same XCache, http
      14    xcache_fwd_root   xcache-fwd  XCache in forwarding mode (root-proxy-internal), root://
      15    xcache_fwd_http   xcache-fwd  the same XCache, http
      16    token_root        origin-token XRootD origin of the same tree, SciTokens required, root://
      17    token_http        origin-token the same, http (bearer token required: 403 without one)
      18    guard_http        guard       nginx bearer-token guard in front of the XCache, http
      --    --                daemons     Rucio's conveyor/judge/reaper daemons in a loop

Everything lives under one state directory (``Layout``): the server venv, configs, logs, pid files,
the PostgreSQL cluster, the RSE trees and the XCache disks. Invariants:

* a process is recorded in ``run/<service>.pid`` (PID and kernel start time, so a reused PID is
  never mistaken for ours) the moment it is spawned; ``down`` stops exactly those PIDs and what is
  left of their process groups, never anything found by name;
* ``up`` is idempotent: running healthy services are kept, dead ones restarted, and a service whose
  dependency (re)starts is restarted too (an XCache never keeps running over a restarted origin);
  the server venv, the database and the seeded data are reused;
* a port that another process holds is reported by number before anything is started;
* only ``up``, ``down`` and ``mount`` change anything; ``status`` reads pid files and probes ports,
  and is fast whether the lake is up or not.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import io
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from datalakefs.demo.status import Knobs, LakeStatus, Seed, ServiceStatus, X509Access
from datalakefs.demo.x509 import USER_DN, X509Error, X509Files, ensure_credentials

DEFAULT_STATE_DIR: Final = ".demo"
DEFAULT_PORT_BASE: Final = 38000
STATE_ENV: Final = "DATALAKEFS_DEMO_STATE"

PORT_OFFSETS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "rucio": 0,
        "dav_https": 1,
        "fts": 2,
        "dav_http": 3,
        "postgres": 4,
        "rucio_https": 5,
        "origin_root": 10,
        "origin_http": 11,
        "xcache_root": 12,
        "xcache_http": 13,
        "xcache_fwd_root": 14,
        "xcache_fwd_http": 15,
        "token_root": 16,
        "token_http": 17,
        "guard_http": 18,
    }
)
MAX_OFFSET: Final = max(PORT_OFFSETS.values())

ORIGIN_RSE: Final = "LAKE-ORIGIN"
SCRATCH_RSE: Final = "SCRATCH"
RUCIO_USER: Final = "ddmlab"
RUCIO_PASSWORD: Final = "secret"
HEARTBEAT_MAX_AGE: Final = 120.0
TOKEN_ISSUER: Final = "https://issuer.demo-lake.invalid"
TOKEN_AUDIENCE: Final = "https://datalakefs.demo-lake"
SEED_FILE_VERSION: Final = 1

ASSETS: Final = Path(__file__).with_name("assets")
ProgressFn = Callable[[str], None]


class DemoError(Exception):
    """A failure of the demo tooling; the message says what to do about it."""


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A process of the lake: its ports, how its health is probed, how it is stopped."""

    name: str
    description: str
    ports: tuple[str, ...]
    http_path: str | None = None
    heartbeat: bool = False
    stop_signal: signal.Signals = signal.SIGTERM
    depends_on: tuple[str, ...] = ()


# Start order; `down` goes the other way, PostgreSQL last.
SERVICES: Final[tuple[ServiceSpec, ...]] = (
    ServiceSpec("postgres", "PostgreSQL (Rucio's database)", ("postgres",), stop_signal=signal.SIGINT),
    ServiceSpec("origin", "XRootD origin of LAKE-ORIGIN", ("origin_root", "origin_http")),
    ServiceSpec("xcache", "XCache, fixed origin", ("xcache_root", "xcache_http"), depends_on=("origin",)),
    ServiceSpec(
        "xcache-fwd",
        "XCache, forwarding mode",
        ("xcache_fwd_root", "xcache_fwd_http"),
        depends_on=("origin",),
    ),
    ServiceSpec("origin-token", "XRootD origin of LAKE-ORIGIN, bearer token required", ("token_root", "token_http")),
    ServiceSpec(
        "guard", "nginx bearer-token guard in front of the XCache", ("guard_http",), depends_on=("origin-token",)
    ),
    ServiceSpec("dav", "nginx WebDAV (SCRATCH, LAKE-ORIGIN https)", ("dav_https", "dav_http")),
    ServiceSpec("fts", "FTS3-REST test shim", ("fts",), http_path="/"),
    ServiceSpec("rucio", "Rucio REST server (gunicorn)", ("rucio",), http_path="/ping", depends_on=("postgres",)),
    ServiceSpec(
        "rucio-tls", "Rucio REST server, https with client certificates (x509 auth)", ("rucio_https",),
        http_path="/ping", depends_on=("postgres",),
    ),
    ServiceSpec(
        "daemons",
        "Rucio daemons loop (conveyor, judge, reaper)",
        (),
        heartbeat=True,
        depends_on=("postgres",),
    ),
)
SERVICE_BY_NAME: Final[Mapping[str, ServiceSpec]] = MappingProxyType({s.name: s for s in SERVICES})


@dataclass(frozen=True, slots=True)
class Layout:
    """Paths inside the state directory (``root`` is absolute)."""

    root: Path

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def lib(self) -> Path:
        """Copies of the assets the lake's own processes run (the lake does not depend on the source tree)."""
        return self.root / "lib"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def xrd_run(self) -> Path:
        return self.run / "xrootd"

    @property
    def pg(self) -> Path:
        return self.root / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg / "data"

    @property
    def rse(self) -> Path:
        """Root of nginx and of the XRootD origin: ``rse/<RSE>/`` is that RSE's prefix."""
        return self.root / "rse"

    @property
    def origin(self) -> Path:
        return self.rse / ORIGIN_RSE

    @property
    def scratch(self) -> Path:
        return self.rse / SCRATCH_RSE

    @property
    def xcache(self) -> Path:
        return self.root / "xcache"

    @property
    def xcache_fwd(self) -> Path:
        return self.root / "xcache-fwd"

    @property
    def token_key(self) -> Path:
        """The offline token issuer's private key (only the lake's owner reads it)."""
        return self.etc / "token-issuer.pem"

    @property
    def token_cache(self) -> Path:
        """``XDG_CACHE_HOME`` of the token origin: scitokens-cpp's pre-filled key cache."""
        return self.root / "token-cache"

    @property
    def mount_cache(self) -> Path:
        return self.root / "mount" / "cache"

    @property
    def mount_state(self) -> Path:
        return self.root / "mount" / "state"

    @property
    def server_config(self) -> Path:
        return self.etc / "rucio.cfg"

    @property
    def client_config(self) -> Path:
        return self.etc / "rucio-client.cfg"

    @property
    def x509_proxy(self) -> Path:
        return self.etc / "x509up"

    @property
    def x509(self) -> X509Files:
        """The demo CA, the TLS front's certificate, the user certificate and its RFC 3820 proxy."""
        return X509Files(self.etc / "x509")

    @property
    def datalakefs_config(self) -> Path:
        return self.etc / "datalakefs.toml"

    @property
    def knobs(self) -> Path:
        return self.etc / "fts-knobs.json"

    @property
    def lake_file(self) -> Path:
        """``{"port_base": N}`` of the last ``up``: down/status find the ports without options."""
        return self.root / "lake.json"

    @property
    def seed_file(self) -> Path:
        return self.root / "seed.json"

    @property
    def mount_file(self) -> Path:
        return self.run / "mount.json"

    @property
    def heartbeat(self) -> Path:
        return self.run / "daemons.heartbeat"

    def pid_file(self, service: str) -> Path:
        return self.run / f"{service}.pid"


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR)


def ports_for(port_base: int) -> dict[str, int]:
    return {key: port_base + offset for key, offset in PORT_OFFSETS.items()}


def service_ports(spec: ServiceSpec, port_base: int) -> dict[str, int]:
    return {key: port_base + PORT_OFFSETS[key] for key in spec.ports}


def check_port_base(port_base: int) -> None:
    if not 1024 <= port_base <= 65535 - MAX_OFFSET:
        raise DemoError(f"--port-base must be between 1024 and {65535 - MAX_OFFSET}, not {port_base}")


# --------------------------------------------------------------------------------------------------
# processes


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


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
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


# --------------------------------------------------------------------------------------------------
# probes


RESERVED_PORTS: Final = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


def reserve_ports(first: int, last: int, progress: ProgressFn, reserved: Path = RESERVED_PORTS) -> None:
    """Keep the kernel from handing the lake's ports to outgoing connections.

    The default port bases lie inside Linux's ephemeral range (32768-60999): any client socket may
    be given one of the lake's ports and make a service fail to bind. As root, the range is added to
    ``ip_local_reserved_ports`` (kept until reboot; listening on a reserved port still works).
    """
    try:
        current = reserved.read_text().strip()
    except OSError:
        return
    wanted = {*range(first, last + 1)}
    for part in filter(None, current.split(",")):
        low, _, high = part.partition("-")
        wanted -= {*range(int(low), int(high or low) + 1)}
    if not wanted:
        return
    try:
        reserved.write_text(",".join(filter(None, [current, f"{first}-{last}"])) + "\n")
    except OSError as exc:
        progress(f"ports {first}-{last} could not be reserved ({exc.strerror}); "
                 "a client socket may take one of them")
        return
    progress(f"reserved ports {first}-{last} against outgoing connections")


def port_in_use(port: int) -> bool:
    """True when something listens on ``port`` at 127.0.0.1 or at the wildcard address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _who_listens(port: int) -> str:
    """Best effort: the `ss` description of the listener on ``port`` ('' when unknown)."""
    ss = shutil.which("ss")
    if ss is None:
        return ""
    out = subprocess.run([ss, "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    users = re.search(r"users:\((.*)\)", out)
    return users.group(1) if users else ""


def _tcp_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


# the lake is on loopback: never route a probe through the caller's HTTP proxy
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str, timeout: float = 3.0, ca_file: Path | None = None) -> bool:
    """True when ``url`` answers below 500; https is verified against ``ca_file``."""
    opener = _DIRECT
    if ca_file is not None:
        context = ssl.create_default_context(cafile=str(ca_file))
        tls = urllib.request.HTTPSHandler(context=context)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), tls)
    try:
        with opener.open(url, timeout=timeout) as resp:
            return bool(resp.status < 500)
    except urllib.error.HTTPError as err:
        with err:  # closes its connection
            return err.code < 500
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# users and permissions


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


def _user_ids(user: str) -> tuple[int, int, set[int]]:
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
        uid, _gid, groups = _user_ids(user)
        for directory in reversed(chain):
            if not _can_enter(directory, uid, groups):
                mode = stat.S_IMODE(directory.stat().st_mode)
                raise DemoError(
                    f"user {user!r} cannot enter {directory} (mode {mode:04o}), which holds the state "
                    f"directory {root}: PostgreSQL and XRootD run as {', '.join(users)} and need every "
                    f"directory above the state directory to be traversable (chmod o+x {directory}), "
                    "or choose a state directory elsewhere (for example under /var/tmp)"
                )


def _chown(path: Path, user: str | None) -> None:
    if user is not None:
        uid, gid, _ = _user_ids(user)
        os.chown(path, uid, gid)


# --------------------------------------------------------------------------------------------------
# the lake


def _pg_bin() -> Path:
    candidates = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise DemoError(
            "PostgreSQL is not installed (/usr/lib/postgresql/*/bin): run scripts/install-system-packages.sh"
        )
    return candidates[-1]


def _require(executable: str) -> str:
    found = shutil.which(executable) or shutil.which(executable, path="/usr/sbin:/sbin:/usr/bin")
    if found is None:
        raise DemoError(f"{executable} is not installed: run scripts/install-system-packages.sh")
    return found


def _clean_env(*, keep_proxies: bool = False, **extra: str) -> dict[str, str]:
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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """Serialise up/down on one state directory (two `up` at once would start everything twice)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Lake:
    """One lake, identified by its state directory; ``port_base`` is only needed by ``up``."""

    def __init__(self, state_dir: Path, port_base: int | None = None) -> None:
        self.layout = Layout(state_dir.expanduser().absolute())
        recorded = self._recorded_port_base()
        self.port_base = port_base if port_base is not None else (recorded or DEFAULT_PORT_BASE)
        check_port_base(self.port_base)
        self.ports = ports_for(self.port_base)
        self.run_as = RunAs.detect()

    # ---------------------------------------------------------------------------------------- state

    def _recorded_port_base(self) -> int | None:
        try:
            return int(json.loads(self.layout.lake_file.read_text())["port_base"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def record(self, service: str) -> ProcessRecord | None:
        rec = read_record(self.layout.pid_file(service))
        return rec if rec is not None and is_alive(rec) else None

    def running(self) -> dict[str, ProcessRecord]:
        return {s.name: rec for s in SERVICES if (rec := self.record(s.name)) is not None}

    def healthy(self, spec: ServiceSpec) -> bool:
        if self.record(spec.name) is None:
            return False
        ports = service_ports(spec, self.port_base)
        if not all(_tcp_open(port) for port in ports.values()):
            return False
        if spec.http_path is not None:
            url = self.urls()[spec.ports[0]] + spec.http_path
            return _http_ok(url, ca_file=self.layout.x509.ca_cert if url.startswith("https:") else None)
        if spec.heartbeat:
            try:
                return time.time() - self.layout.heartbeat.stat().st_mtime < HEARTBEAT_MAX_AGE
            except FileNotFoundError:
                return False
        return True

    def urls(self) -> dict[str, str]:
        p = self.ports
        return {
            "rucio": f"http://127.0.0.1:{p['rucio']}",
            "dav_https": f"https://127.0.0.1:{p['dav_https']}",
            "dav_http": f"http://127.0.0.1:{p['dav_http']}",
            "fts": f"http://127.0.0.1:{p['fts']}",
            "origin_root": f"root://127.0.0.1:{p['origin_root']}",
            "origin_http": f"http://127.0.0.1:{p['origin_http']}",
            "xcache_root": f"root://127.0.0.1:{p['xcache_root']}",
            "xcache_http": f"http://127.0.0.1:{p['xcache_http']}",
            "xcache_fwd_root": f"root://127.0.0.1:{p['xcache_fwd_root']}",
            "xcache_fwd_http": f"http://127.0.0.1:{p['xcache_fwd_http']}",
            "token_root": f"root://127.0.0.1:{p['token_root']}",
            "token_http": f"http://127.0.0.1:{p['token_http']}",
            "guard_http": f"http://127.0.0.1:{p['guard_http']}",
            "postgres": f"postgresql://rucio@127.0.0.1:{p['postgres']}/rucio",
            "rucio_https": f"https://127.0.0.1:{p['rucio_https']}",
        }

    def scratch_pfn_prefixes(self) -> tuple[str, ...]:
        """PFN prefixes of SCRATCH's protocols (https, http), which map to ``layout.scratch``."""
        return (
            f"https://127.0.0.1:{self.ports['dav_https']}/{SCRATCH_RSE}/",
            f"http://127.0.0.1:{self.ports['dav_http']}/{SCRATCH_RSE}/",
        )

    def client_env(self) -> dict[str, str]:
        """Environment for rucio clients (and `datalakefs mount`) to use this lake."""
        return {
            "RUCIO_CONFIG": str(self.layout.client_config),
            "X509_USER_PROXY": str(self.layout.x509_proxy),
            "DATALAKEFS_CONFIG": str(self.layout.datalakefs_config),
            STATE_ENV: str(self.layout.root),
        }

    def x509_rucio_config(self, *, proxy: bool) -> str:
        """The lake's rucio.cfg for ``x509`` auth (user certificate and key), or ``x509_proxy`` auth
        (the RFC 3820 proxy) when ``proxy``: authentication at the TLS front, the API at plain http."""
        access = self.x509_access()
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(self.layout.client_config)
        client = parser["client"]
        for key in ("username", "password", "auth_token_file_path"):  # the token file holds userpass's token
            client.pop(key, None)
        client["auth_host"] = access.auth_host
        client["ca_cert"] = str(access.ca_cert)
        if proxy:
            client["auth_type"] = "x509_proxy"
            client["client_x509_proxy"] = str(access.proxy)
        else:
            client["auth_type"] = "x509"
            client["client_cert"] = str(access.user_cert)
            client["client_key"] = str(access.user_key)
        text = io.StringIO()
        parser.write(text)
        return f"# rucio.cfg for {client['auth_type']} auth at the demo lake's TLS front\n{text.getvalue()}"

    def read_knobs(self) -> Knobs:
        try:
            return Knobs.from_json(json.loads(self.layout.knobs.read_text()))
        except FileNotFoundError:
            return Knobs()

    def write_knobs(self, knobs: Knobs) -> None:
        """Set the FTS shim's knobs; the running shim picks them up before its next file copy."""
        self.layout.etc.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.layout.knobs, json.dumps(knobs.to_json()) + "\n")

    def read_seed(self) -> Seed | None:
        try:
            data = json.loads(self.layout.seed_file.read_text())
        except FileNotFoundError:
            return None
        if data.get("file_version") != SEED_FILE_VERSION or data.get("seed") is None:
            return None
        return Seed.from_json(data["seed"])

    def mount_record(self) -> tuple[Path | None, ProcessRecord | None]:
        try:
            data = json.loads(self.layout.mount_file.read_text())
        except FileNotFoundError:
            return None, None
        rec = None
        if data.get("pid") is not None:
            rec = ProcessRecord(pid=int(data["pid"]), start_time=int(data["start_time"]))
        return Path(data["mountpoint"]), rec

    def status(self) -> LakeStatus:
        services = {}
        for spec in SERVICES:
            rec = self.record(spec.name)
            ports = service_ports(spec, self.port_base)
            url = self.urls().get(spec.ports[0]) if spec.ports else None
            services[spec.name] = ServiceStatus(
                name=spec.name,
                description=spec.description,
                pid=None if rec is None else rec.pid,
                ports=ports,
                healthy=rec is not None and self.healthy(spec),
                url=url,
            )
        mountpoint, _ = self.mount_record()
        layout = self.layout
        return LakeStatus(
            state_dir=layout.root,
            port_base=self.port_base,
            healthy=all(s.healthy for s in services.values()),
            services=services,
            rucio_config=layout.client_config,
            server_config=layout.server_config,
            x509_user_proxy=layout.x509_proxy,
            datalakefs_config=layout.datalakefs_config,
            mountpoint=mountpoint,
            mounted=mountpoint is not None and is_mounted(mountpoint),
            urls=self.urls(),
            paths={
                "rse": layout.rse,
                "origin": layout.origin,
                "scratch": layout.scratch,
                "xcache": layout.xcache,
                "xcache_fwd": layout.xcache_fwd,
                "log": layout.log,
                "venv": layout.venv,
            },
            knobs=self.read_knobs(),
            seed=self.read_seed(),
            env=self.client_env(),
            token_command=self.token_command(),
            x509=self.x509_access(),
        )

    def x509_access(self) -> X509Access:
        """What a rucio client needs for x509 / x509_proxy authentication at the TLS front."""
        files = self.layout.x509
        return X509Access(
            auth_host=self.urls()["rucio_https"],
            ca_cert=files.ca_cert,
            user_cert=files.user_cert,
            user_key=files.user_key,
            proxy=files.proxy,
            dn=USER_DN,
        )

    # ------------------------------------------------------------------------------------------- up

    def up(self, progress: ProgressFn) -> None:
        """Start every service that is not running and wait until all are healthy (seeding is separate)."""
        started = time.monotonic()

        def step(message: str) -> None:
            progress(f"[up {time.monotonic() - started:6.2f}s] {message}")

        self._preflight()
        with _locked(self.layout):
            running = self.running()
            recorded = self._recorded_port_base()
            if running and recorded is not None and recorded != self.port_base:
                raise DemoError(
                    f"the lake in {self.layout.root} is running with port base {recorded}: "
                    f"run `datalakefs demo down` first or use --port-base {recorded}"
                )
            to_start = self._plan(running)
            reserve_ports(self.port_base, self.port_base + MAX_OFFSET, step)
            self._check_ports(to_start)
            self._make_dirs()
            self._write_json(self.layout.lake_file, {"port_base": self.port_base})
            self._ensure_venv(step, running)
            self._write_configs()
            for name in to_start:
                if (rec := self.record(name)) is not None:
                    step(f"restarting {name}: a service it depends on restarts")
                    stop_records({name: (rec, SERVICE_BY_NAME[name].stop_signal)}, timeout=15)
            if "postgres" in to_start:
                self._start_postgres(step)
            self._ensure_database(step)
            for spec in SERVICES:
                if spec.name in to_start and spec.name != "postgres":
                    self._spawn_service(spec)
            self._wait_healthy(to_start, step)
            step(f"lake up: {len(SERVICES)} services healthy, port base {self.port_base}")

    def _preflight(self) -> None:
        for exe in ("xrootd", "nginx", "openssl"):
            _require(exe)
        _pg_bin()
        if not Path("/usr/lib/nginx/modules/ngx_http_dav_ext_module.so").exists():
            raise DemoError("nginx's dav_ext module is missing: run scripts/install-system-packages.sh")
        users = [u for u in (self.run_as.postgres, self.run_as.xrootd) if u is not None]
        check_traversable(self.layout.root, users)

    def _plan(self, running: Mapping[str, ProcessRecord]) -> list[str]:
        """Services to (re)start: the ones not running, plus every running dependent of one of them."""
        to_start: list[str] = []
        for spec in SERVICES:
            if spec.name not in running or any(dep in to_start for dep in spec.depends_on):
                to_start.append(spec.name)
        return to_start

    def _check_ports(self, to_start: Sequence[str]) -> None:
        for name in to_start:
            spec = SERVICE_BY_NAME[name]
            if self.record(name) is not None:
                continue
            for key, port in service_ports(spec, self.port_base).items():
                if port_in_use(port):
                    who = _who_listens(port)
                    raise DemoError(
                        f"port {port} ({key}: {spec.description}) is already in use"
                        + (f" by {who}" if who else " by another process")
                        + f"; stop it or choose another --port-base (now {self.port_base})"
                    )

    def _make_dirs(self) -> None:
        layout = self.layout
        os.umask(0o022)
        for path in (
            layout.root,
            layout.etc,
            layout.log,
            layout.run,
            layout.lib,
            layout.rse,
            layout.origin,
            layout.scratch,
            layout.mount_cache,
            layout.mount_state,
        ):
            path.mkdir(parents=True, exist_ok=True)
        for path in (layout.xrd_run, layout.xcache, layout.xcache_fwd, layout.token_cache):
            path.mkdir(parents=True, exist_ok=True)
            _chown(path, self.run_as.xrootd)
        layout.pg.mkdir(parents=True, exist_ok=True)
        _chown(layout.pg, self.run_as.postgres)
        for asset in ("daemons.py", "fts_shim.py", "bootstrap.py", "token_kit.py", "rucio_x509_front.py",
                      "rucio_tls_gunicorn.py"):
            shutil.copyfile(ASSETS / asset, layout.lib / asset)

    @staticmethod
    def _write_json(path: Path, data: Mapping[str, object]) -> None:
        _write_atomic(path, json.dumps(data, indent=1) + "\n")

    # ----------------------------------------------------------------------------------------- venv

    def _venv_requirements(self) -> tuple[str, str]:
        requirements = (ASSETS / "server-requirements.txt").read_text()
        return requirements, hashlib.sha256(requirements.encode()).hexdigest()

    def _venv_current(self) -> bool:
        marker = self.layout.venv / ".datalakefs-requirements"
        return (
            marker.exists()
            and marker.read_text().strip() == self._venv_requirements()[1]
            and (self.layout.venv / "bin" / "gunicorn").exists()
        )

    def _ensure_venv(self, step: ProgressFn, running: Mapping[str, ProcessRecord]) -> None:
        """Build the server venv unless it exists for exactly these pinned requirements."""
        if self._venv_current():
            return
        venv_users = sorted(set(running) & {"rucio", "daemons", "fts"})
        if venv_users:
            raise DemoError(
                f"the server venv must be rebuilt (its pinned requirements changed) but {', '.join(venv_users)} "
                "run from it: run `datalakefs demo down` first"
            )
        venv = self.layout.venv
        requirements, digest = self._venv_requirements()
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        step(f"creating the Rucio server venv in {venv} (one time, about 30 s)")
        if venv.exists():
            shutil.rmtree(venv)
        req_file = self.layout.lib / "server-requirements.txt"
        req_file.write_text(requirements)
        log = self.layout.log / "venv.log"
        with open(log, "w") as fh:
            rc = subprocess.run(
                [python, "-m", "venv", str(venv)], stdout=fh, stderr=subprocess.STDOUT, check=False
            ).returncode
            if rc == 0:
                rc = subprocess.run(
                    [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", "-r", str(req_file)],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    check=False,
                    env=_clean_env(keep_proxies=True),
                ).returncode
        if rc != 0 or not (venv / "bin" / "gunicorn").exists():
            raise DemoError(f"could not build the server venv (rc {rc}); see {log}:\n{_tail(log)}")
        (venv / ".datalakefs-requirements").write_text(digest + "\n")
        step("server venv ready")

    def _site_packages(self) -> Path:
        found = sorted(self.layout.venv.glob("lib/python3*/site-packages/rucio"))
        if not found:
            raise DemoError(f"rucio is missing from the server venv {self.layout.venv}: delete it and run up again")
        return found[-1]

    # -------------------------------------------------------------------------------------- configs

    def _write_configs(self) -> None:
        layout, p = self.layout, self.ports
        db_url = f"postgresql+psycopg://rucio:rucio@127.0.0.1:{p['postgres']}/rucio"
        client_section = _render(
            "rucio-client.cfg.in",
            rucio_port=p["rucio"],
            username=RUCIO_USER,
            password=RUCIO_PASSWORD,
            run=layout.run,
        )
        _write_atomic(layout.client_config, client_section, 0o600)
        _write_atomic(
            layout.server_config,
            _render(
                "rucio-server.cfg.in",
                log=layout.log,
                venv=layout.venv,
                db_url=db_url,
                username=RUCIO_USER,
                password=RUCIO_PASSWORD,
                etc=layout.etc,
                client_section=client_section,
            ),
            0o600,
        )
        template = (layout.venv / "rucio" / "etc" / "alembic.ini.template").read_text()
        logging_sections = template[template.index("[loggers]") :]
        _write_atomic(
            layout.etc / "alembic.ini",
            f"[alembic]\nscript_location = {self._site_packages()}/db/sqla/migrate_repo/\n"
            f"sqlalchemy.url = {db_url}\n\n{logging_sections}",
        )
        if not (layout.etc / "dav.crt").exists() or not (layout.etc / "dav.key").exists():
            subprocess.run(
                [
                    _require("openssl"),
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "3650",
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout",
                    str(layout.etc / "dav.key"),
                    "-out",
                    str(layout.etc / "dav.crt"),
                ],
                capture_output=True,
                check=True,
            )
        # rucio's webdav protocol refuses to work without an X509 proxy file and presents it as TLS
        # client certificate; nginx never asks for one, so any well-formed cert+key PEM will do.
        _write_atomic(
            layout.x509_proxy,
            (layout.etc / "dav.crt").read_text() + (layout.etc / "dav.key").read_text(),
            0o600,
        )
        _write_atomic(
            layout.etc / "nginx.conf",
            _render(
                "nginx.conf.in",
                user_directive="user root;" if os.geteuid() == 0 else "",
                run=layout.run,
                log=layout.log,
                etc=layout.etc,
                rse=layout.rse,
                dav_https=p["dav_https"],
                dav_http=p["dav_http"],
            ),
        )
        _write_atomic(
            layout.etc / "xrootd-origin.cfg",
            _render(
                "xrootd-origin.cfg.in",
                rse=layout.rse,
                admin=layout.xrd_run,
                root_port=p["origin_root"],
                http_port=p["origin_http"],
            ),
        )
        for name, cache_dir, origin, root_key, http_key in (
            ("xcache", layout.xcache, f"localhost:{p['origin_root']}", "xcache_root", "xcache_http"),
            ("xcache-fwd", layout.xcache_fwd, "=", "xcache_fwd_root", "xcache_fwd_http"),
        ):
            _write_atomic(
                layout.etc / f"xrootd-{name}.cfg",
                _render(
                    "xrootd-xcache.cfg.in",
                    admin=layout.xrd_run,
                    root_port=p[root_key],
                    http_port=p[http_key],
                    origin=origin,
                    cache_dir=cache_dir,
                ),
            )
        self._write_token_configs()
        self._ensure_x509()
        if not layout.knobs.exists():
            self.write_knobs(Knobs())
        self.write_datalakefs_config()

    def _write_token_configs(self) -> None:
        """The token origin, its offline issuer's key cache, and the guard in front of the XCache."""
        layout, p = self.layout, self.ports
        _write_atomic(
            layout.etc / "scitokens.cfg", _render("scitokens.cfg.in", audience=TOKEN_AUDIENCE, issuer=TOKEN_ISSUER)
        )
        _write_atomic(
            layout.etc / "xrootd-origin-token.cfg",
            _render(
                "xrootd-token.cfg.in",
                rse=layout.rse,
                admin=layout.xrd_run,
                root_port=p["token_root"],
                http_port=p["token_http"],
                scitokens_cfg=layout.etc / "scitokens.cfg",
            ),
        )
        _write_atomic(
            layout.etc / "nginx-guard.conf",
            _render(
                "nginx-guard.conf.in",
                user_directive="user root;" if os.geteuid() == 0 else "",
                run=layout.run,
                log=layout.log,
                guard_http=p["guard_http"],
                token_http=p["token_http"],
                xcache_http=p["xcache_http"],
            ),
        )
        keycache = layout.token_cache / "scitokens" / "scitokens_cpp.sqllite"
        subprocess.run(
            [str(layout.venv / "bin" / "python"), str(layout.lib / "token_kit.py"), "init",
             "--key", str(layout.token_key), "--keycache", str(keycache), "--issuer", TOKEN_ISSUER],
            capture_output=True,
            check=True,
            env=_clean_env(),
        )
        for path in (keycache.parent, keycache):
            _chown(path, self.run_as.xrootd)

    def _ensure_x509(self) -> None:
        """The demo CA, the TLS front's certificate, the user certificate and its proxy (made once)."""
        files = self.layout.x509
        try:
            ensure_credentials(files, _require("openssl"))
        except X509Error as exc:
            raise DemoError(f"could not make the demo X.509 credentials in {files.directory}: {exc}") from None

    def token_command(self) -> tuple[str, ...]:
        """argv that prints a valid bearer token for the token origin and the guard; append
        ``--expired``, ``--wrong-key``, ``--lifetime N`` or ``--scope S`` for other tokens."""
        layout = self.layout
        return (
            str(layout.venv / "bin" / "python"),
            str(layout.lib / "token_kit.py"),
            "mint",
            "--key",
            str(layout.token_key),
            "--issuer",
            TOKEN_ISSUER,
            "--audience",
            TOKEN_AUDIENCE,
        )

    def write_datalakefs_config(self) -> None:
        """The datalakefs config to mount this lake (keys of datalakefs.config.Config)."""
        layout = self.layout
        local = [f"{prefix}={layout.scratch}/" for prefix in self.scratch_pfn_prefixes()]
        lines = [
            "# datalakefs config for the demo lake (written by `datalakefs demo up`).",
            "# Mount with: datalakefs mount --config THIS_FILE MOUNTPOINT",
            f"rucio_config = {_toml_str(str(layout.client_config))}",
            f"xcache = {_toml_str(self.urls()['xcache_http'])}",
            'xcache_mode = "swap"',
            f"staging_rse = {_toml_str(SCRATCH_RSE)}",
            f"upload_rse = {_toml_str(SCRATCH_RSE)}",
            f"storage_ca_bundle = {_toml_str(str(layout.etc / 'dav.crt'))}",
            "staging_local_paths = [" + ", ".join(_toml_str(x) for x in local) + "]",
            f"cache_dir = {_toml_str(str(layout.mount_cache))}",
            f"state_dir = {_toml_str(str(layout.mount_state))}",
        ]
        _write_atomic(layout.datalakefs_config, "\n".join(lines) + "\n")

    # ------------------------------------------------------------------------------------- postgres

    def _pg_run(self, argv: Sequence[str], log: Path) -> None:
        ident = Identity.of(self.run_as.postgres)
        with open(log, "ab") as fh:
            rc = subprocess.run(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.layout.pg,
                check=False,
                user=ident.user,
                group=ident.group,
                extra_groups=ident.extra_groups,
            ).returncode
        if rc != 0:
            raise DemoError(f"{Path(argv[0]).name} failed (rc {rc}); see {log}:\n{_tail(log)}")

    def _start_postgres(self, step: ProgressFn) -> None:
        layout, pg_bin = self.layout, _pg_bin()
        if not (layout.pg_data / "PG_VERSION").exists():
            (layout.pg / "bootstrapped").unlink(missing_ok=True)
            if layout.pg_data.exists():
                shutil.rmtree(layout.pg_data)
            self._pg_run(
                [
                    str(pg_bin / "initdb"),
                    "-D",
                    str(layout.pg_data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                layout.log / "initdb.log",
            )
            step("PostgreSQL cluster created")
        self._spawn(
            "postgres",
            [
                str(pg_bin / "postgres"),
                "-D",
                str(layout.pg_data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.ports["postgres"]),
                "-k",
                str(layout.pg),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            cwd=layout.pg,
            user=self.run_as.postgres,
            env=_clean_env(LC_ALL="C"),
        )
        deadline = time.monotonic() + 60
        while True:
            ready = (
                subprocess.run(
                    [str(pg_bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.ports["postgres"])],
                    check=False,
                ).returncode
                == 0
            )
            if ready:
                break
            if self.record("postgres") is None or time.monotonic() > deadline:
                log = layout.log / "postgres.out"
                raise DemoError(f"PostgreSQL did not start; see {log}:\n{_tail(log)}")
            time.sleep(0.1)
        step(f"PostgreSQL ready on 127.0.0.1:{self.ports['postgres']}")

    def _psql(self, sql: str) -> str:
        return subprocess.run(
            [
                str(_pg_bin() / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.ports["postgres"]),
                "-U",
                "postgres",
                "-tAq",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=True,
            env=_clean_env(),
        ).stdout.strip()

    def _ensure_database(self, step: ProgressFn) -> None:
        layout = self.layout
        marker = layout.pg / "bootstrapped"
        if marker.exists():
            return
        if self._psql("select 1 from pg_roles where rolname = 'rucio'") != "1":
            self._psql("create user rucio password 'rucio'")
        if self._psql("select 1 from pg_database where datname = 'rucio'") != "1":
            self._psql("create database rucio owner rucio")
        log = layout.log / "bootstrap.log"
        with open(log, "w") as fh:
            rc = subprocess.run(
                [str(layout.venv / "bin" / "python"), str(layout.lib / "bootstrap.py")],
                stdout=fh,
                stderr=subprocess.STDOUT,
                check=False,
                env=_clean_env(RUCIO_CONFIG=str(layout.server_config)),
            ).returncode
        if rc != 0:
            raise DemoError(f"the Rucio schema bootstrap failed (rc {rc}); see {log}:\n{_tail(log)}")
        marker.write_text("rucio schema, VO def and account root created\n")
        step("Rucio schema and root account created")

    # ------------------------------------------------------------------------------------ processes

    def _spawn(
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
        _CHILDREN.append(proc)
        rec = ProcessRecord(pid=proc.pid, start_time=start_time if start_time is not None else -1)
        _write_atomic(self.layout.pid_file(name), json.dumps(rec.to_json()) + "\n")
        return rec

    def _spawn_service(self, spec: ServiceSpec) -> None:
        layout, p = self.layout, self.ports
        venv_python = str(layout.venv / "bin" / "python")
        server_env = _clean_env(RUCIO_CONFIG=str(layout.server_config), X509_USER_PROXY=str(layout.x509_proxy))
        xrootd_user = ["-R", self.run_as.xrootd] if self.run_as.xrootd else []
        if spec.name in ("origin", "xcache", "xcache-fwd"):
            self._spawn(
                spec.name,
                [
                    _require("xrootd"),
                    *xrootd_user,
                    "-c",
                    str(layout.etc / f"xrootd-{spec.name}.cfg"),
                    "-n",
                    spec.name,
                ],
                cwd=layout.xrd_run,
                env=_clean_env(),
            )
        elif spec.name == "origin-token":
            self._spawn(
                spec.name,
                [_require("xrootd"), *xrootd_user, "-c", str(layout.etc / "xrootd-origin-token.cfg"), "-n", spec.name],
                cwd=layout.xrd_run,
                env=_clean_env(XDG_CACHE_HOME=str(layout.token_cache)),
            )
        elif spec.name == "guard":
            self._spawn(
                "guard",
                [_require("nginx"), "-p", f"{layout.run}/", "-e", str(layout.log / "guard-error.log"),
                 "-c", str(layout.etc / "nginx-guard.conf")],
                cwd=layout.run,
                env=_clean_env(),
            )
        elif spec.name == "rucio-tls":
            x509 = layout.x509
            tls = [
                "--config", str(layout.lib / "rucio_tls_gunicorn.py"),
                "--pythonpath", str(layout.lib),
                "--certfile", str(x509.host_cert),
                "--keyfile", str(x509.host_key),
                "--ca-certs", str(x509.ca_cert),
                "--cert-reqs", str(int(ssl.CERT_OPTIONAL)),
            ]
            argv = self._gunicorn("rucio-tls", "rucio_https", "rucio_x509_front:application", workers=1, extra=tls)
            self._spawn("rucio-tls", argv, cwd=layout.run, env=server_env)
        elif spec.name == "dav":
            self._spawn(
                "dav",
                [
                    _require("nginx"),
                    "-p",
                    f"{layout.run}/",
                    "-e",
                    str(layout.log / "nginx-error.log"),
                    "-c",
                    str(layout.etc / "nginx.conf"),
                ],
                cwd=layout.run,
                env=_clean_env(),
            )
        elif spec.name == "fts":
            self._spawn(
                "fts",
                [
                    venv_python,
                    str(layout.lib / "fts_shim.py"),
                    "--port",
                    str(p["fts"]),
                    "--knobs",
                    str(layout.knobs),
                    "--state",
                    str(layout.run / "fts-jobs.json"),
                    "--log",
                    str(layout.log / "fts-shim.log"),
                ],
                cwd=layout.run,
                env=_clean_env(),
            )
        elif spec.name == "rucio":
            argv = self._gunicorn("rucio", "rucio", "rucio.web.rest.flaskapi.v1.main:application", workers=2)
            self._spawn("rucio", argv, cwd=layout.run, env=server_env)
        elif spec.name == "daemons":
            layout.heartbeat.unlink(missing_ok=True)
            self._spawn(
                "daemons",
                [
                    venv_python,
                    str(layout.lib / "daemons.py"),
                    "--interval",
                    "1",
                    "--heartbeat",
                    str(layout.heartbeat),
                ],
                cwd=layout.run,
                env=server_env,
            )
        else:
            raise AssertionError(f"no command for service {spec.name}")

    def _gunicorn(
        self, name: str, port_key: str, app: str, *, workers: int, extra: Sequence[str] = ()
    ) -> list[str]:
        """argv of a gunicorn serving ``app`` on ``port_key``, logging to log/<name>-{access,server}.log."""
        log = self.layout.log
        return [
            str(self.layout.venv / "bin" / "gunicorn"),
            *extra,
            "--bind", f"127.0.0.1:{self.ports[port_key]}",
            "--workers", str(workers),
            "--threads", "4",
            "--timeout", "300",
            "--graceful-timeout", "3",
            "--no-control-socket",
            "--access-logfile", str(log / f"{name}-access.log"),
            "--error-logfile", str(log / f"{name}-server.log"),
            app,
        ]

    def _wait_healthy(self, started: Sequence[str], step: ProgressFn, timeout: float = 120) -> None:
        """Wait until every service is healthy; the ones in ``started`` are announced when they are."""
        pending = list(SERVICES)
        deadline = time.monotonic() + timeout
        while pending:
            for spec in list(pending):
                if self.healthy(spec):
                    pending.remove(spec)
                    if spec.name in started:
                        step(f"{spec.name} healthy ({spec.description})")
                elif self.record(spec.name) is None:
                    log = self.layout.log / f"{spec.name}.out"
                    raise DemoError(f"{spec.name} ({spec.description}) is not running; see {log}:\n{_tail(log)}")
            if pending and time.monotonic() > deadline:
                names_left = ", ".join(s.name for s in pending)
                raise DemoError(f"not healthy after {timeout:.0f} s: {names_left}; see {self.layout.log}")
            if pending:
                time.sleep(0.1)

    # ----------------------------------------------------------------------------------------- down

    def down(self, progress: ProgressFn) -> None:
        """Unmount the demo mount, stop every recorded process by PID, and check that no port is left open."""
        started = time.monotonic()
        if not self.layout.root.exists():
            progress(f"[down] nothing to stop: {self.layout.root} does not exist")
            return
        with _locked(self.layout):
            self._unmount(progress)
            records = {}
            for spec in SERVICES:
                rec = read_record(self.layout.pid_file(spec.name))
                if rec is not None:
                    records[spec.name] = (rec, spec.stop_signal)
            others = {n: r for n, r in records.items() if n != "postgres"}
            stopped = stop_records(others, timeout=20)
            if "postgres" in records:
                stopped += stop_records({"postgres": records["postgres"]}, timeout=30)
            for spec in SERVICES:
                self.layout.pid_file(spec.name).unlink(missing_ok=True)
            busy = [port for port in self.ports.values() if port_in_use(port)]
            if busy:
                raise DemoError(
                    "stopped every recorded process, but these ports are still in use (not by the lake's "
                    f"recorded processes): {', '.join(map(str, busy))}"
                )
        what = ", ".join(stopped) if stopped else "nothing was running"
        progress(f"[down {time.monotonic() - started:.2f}s] stopped: {what}")

    def _unmount(self, progress: ProgressFn) -> None:
        """Unmount what `demo mount` mounted and stop its daemon by PID.

        First the polite way (`datalakefs umount` waits for the daemon to finish its work), then
        fusermount3, then a lazy unmount for a daemon that no longer answers; finally the recorded
        daemon PID is stopped, which also aborts whatever FUSE requests were still pending.
        """
        mountpoint, rec = self.mount_record()
        if mountpoint is None:
            return
        attempts: list[tuple[list[str], float]] = []
        exe = datalakefs_executable()
        if exe is not None and is_mounted(mountpoint) and mount_answers(mountpoint):
            config = str(self.layout.datalakefs_config)
            attempts.append(([exe, "umount", "--config", config, str(mountpoint)], 60))
        fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
        if fusermount is not None:
            attempts += [([fusermount, "-u", str(mountpoint)], 10), ([fusermount, "-u", "-z", str(mountpoint)], 10)]
        errors = []
        for argv, timeout in attempts:
            if not is_mounted(mountpoint):
                break
            try:
                result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
                errors.append(f"{shlex.join(argv)}: {(result.stderr or result.stdout).strip()}")
            except subprocess.TimeoutExpired:
                errors.append(f"{shlex.join(argv)}: no answer after {timeout:.0f} s")
        if rec is not None:
            stop_records({"mount": (rec, signal.SIGTERM)}, timeout=15)
        if is_mounted(mountpoint):
            raise DemoError(f"could not unmount {mountpoint}: {'; '.join(errors) or 'no unmount tool found'}")
        if errors:
            progress(f"unmounted {mountpoint}")
        self.layout.mount_file.unlink(missing_ok=True)

    def record_mount(self, mountpoint: Path, rec: ProcessRecord | None) -> None:
        data: dict[str, object] = {"mountpoint": str(mountpoint), "pid": None, "start_time": None}
        if rec is not None:
            data.update(rec.to_json())
        self._write_json(self.layout.mount_file, data)

    def spawn_mount(self, argv: Sequence[str], env: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.layout.log / "mount.out"
        fh = open(log, "ab")  # noqa: SIM115 -- handed to the child, closed right after the spawn
        with fh:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
            )
        _CHILDREN.append(proc)
        return proc, log


_CHILDREN: list[subprocess.Popen[bytes]] = []


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
        uid, gid, _ = _user_ids(user)
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


def _render(template: str, **values: object) -> str:
    return string.Template((ASSETS / template).read_text()).substitute({k: str(v) for k, v in values.items()})


def _toml_str(value: str) -> str:
    # a JSON string is a valid TOML basic string (same escapes)
    return json.dumps(value)


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mounted(path: Path) -> bool:
    target = os.path.abspath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except FileNotFoundError:
        return False
    return any(_unescape_mountinfo(line.split()[4]) == target for line in lines)
