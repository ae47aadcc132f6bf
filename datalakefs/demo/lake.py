"""The local data lake: starts its services in order, stops them, reports them, mounts the lake.

Each service is described and started by its own module in ``datalakefs.demo.services``; the
ports and paths are in ``datalakefs.demo.layout``, the process records in
``datalakefs.demo.processes``. Invariants:

* ``up`` is idempotent: running healthy services are kept, dead ones restarted, and a service whose
  dependency (re)starts is restarted too (an XCache never keeps running over a restarted origin);
  the server venv, the database and the seeded data are reused;
* a port that another process holds is reported by number before anything is started;
* only ``up``, ``down`` and ``mount`` change anything; ``status`` reads pid files and probes ports,
  and is fast whether the lake is up or not.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Final

from datalakefs.demo import tokens
from datalakefs.demo.layout import (
    ASSETS,
    DEFAULT_PORT_BASE,
    HEARTBEAT_MAX_AGE,
    MAX_OFFSET,
    ORIGIN_RSE,
    SCRATCH_RSE,
    SEED_FILE_VERSION,
    STATE_ENV,
    DemoError,
    Layout,
    ProgressFn,
    check_port_base,
    ports_for,
)
from datalakefs.demo.probes import http_ok, port_in_use, reserve_ports, tcp_open, who_listens
from datalakefs.demo.processes import (
    CHILDREN,
    ProcessRecord,
    RunAs,
    ServiceSpec,
    Site,
    check_traversable,
    chown,
    datalakefs_executable,
    is_alive,
    is_mounted,
    mount_answers,
    read_record,
    require,
    service_ports,
    stop_records,
    tail,
    write_atomic,
)
from datalakefs.demo.services import daemons, fts, nginx, postgres, rucio, xrootd
from datalakefs.demo.status import Knobs, LakeStatus, Seed, ServiceStatus, X509Access
from datalakefs.demo.x509 import USER_DN, X509Error, ensure_credentials

# Start order; `down` goes the other way, PostgreSQL last.
SERVICES: Final[tuple[ServiceSpec, ...]] = (
    postgres.SERVICE,
    xrootd.ORIGIN,
    xrootd.XCACHE,
    xrootd.XCACHE_FWD,
    xrootd.TOKEN_ORIGIN,
    nginx.GUARD,
    nginx.AUTHORISER,
    nginx.DAV,
    nginx.TLS_FRONT,
    fts.SERVICE,
    rucio.SERVER,
    rucio.TLS_FRONT,
    daemons.SERVICE,
)
SERVICE_BY_NAME: Final[Mapping[str, ServiceSpec]] = MappingProxyType({s.name: s for s in SERVICES})


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
        self.site = Site(self.layout, self.ports, self.run_as)

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
        if not all(tcp_open(port) for port in ports.values()):
            return False
        if spec.http_path is not None:
            url = self.urls()[spec.ports[0]] + spec.http_path
            return http_ok(url, ca_file=self.layout.x509.ca_cert if url.startswith("https:") else None)
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
        """A rucio.cfg for ``x509`` (or, when ``proxy``, ``x509_proxy``) auth at the TLS front."""
        return rucio.x509_client_config(self.layout, self.x509_access(), proxy=proxy)

    def read_knobs(self) -> Knobs:
        return fts.read_knobs(self.layout)

    def write_knobs(self, knobs: Knobs) -> None:
        """Set the FTS shim's knobs; the running shim picks them up before its next file copy."""
        fts.write_knobs(self.layout, knobs)

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
            rucio.ensure_venv(self.layout, step, running)
            self._write_configs()
            for name in to_start:
                if (rec := self.record(name)) is not None:
                    step(f"restarting {name}: a service it depends on restarts")
                    stop_records({name: (rec, SERVICE_BY_NAME[name].stop_signal)}, timeout=15)
            if postgres.SERVICE.name in to_start:
                postgres.SERVICE.start(self.site, step)
            rucio.ensure_database(self.site, step)
            for spec in SERVICES:
                if spec.name in to_start and spec is not postgres.SERVICE:
                    spec.start(self.site, step)
            self._wait_healthy(to_start, step)
            step(f"lake up: {len(SERVICES)} services healthy, port base {self.port_base}")

    def _preflight(self) -> None:
        for exe in ("xrootd", "nginx", "openssl"):
            require(exe)
        postgres.pg_bin()
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
                    who = who_listens(port)
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
            chown(path, self.run_as.xrootd)
        layout.pg.mkdir(parents=True, exist_ok=True)
        chown(layout.pg, self.run_as.postgres)
        for asset in ("daemons.py", "fts_shim.py", "bootstrap.py", "token_kit.py", "rucio_x509_front.py",
                      "rucio_tls_gunicorn.py", "dav_auth.py", "dav_tls_front.py", "supervise.py"):
            shutil.copyfile(ASSETS / asset, layout.lib / asset)

    @staticmethod
    def _write_json(path: Path, data: Mapping[str, object]) -> None:
        write_atomic(path, json.dumps(data, indent=1) + "\n")

    # -------------------------------------------------------------------------------------- configs

    def _write_configs(self) -> None:
        rucio.write_configs(self.site)
        nginx.write_configs(self.site)
        xrootd.write_configs(self.site)
        tokens.init_issuer(self.layout, self.run_as.xrootd)
        tokens.write_service_token(self.layout)
        self._ensure_x509()
        if not self.layout.knobs.exists():
            self.write_knobs(Knobs())
        self.write_datalakefs_config()

    def _ensure_x509(self) -> None:
        """The demo CA, the TLS front's certificate, the user certificate and its proxy (made once)."""
        files = self.layout.x509
        try:
            ensure_credentials(files, require("openssl"))
        except X509Error as exc:
            raise DemoError(f"could not make the demo X.509 credentials in {files.directory}: {exc}") from None

    def token_command(self) -> tuple[str, ...]:
        """argv that prints a bearer token of the lake's issuer (see :func:`tokens.token_command`)."""
        return tokens.token_command(self.layout)

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
            f"xcache_rses = [{_toml_str(ORIGIN_RSE)}]",  # the XCache's one origin
            f"staging_rse = {_toml_str(SCRATCH_RSE)}",
            f"upload_rse = {_toml_str(SCRATCH_RSE)}",
            f"storage_ca_bundle = {_toml_str(str(layout.etc / 'dav.crt'))}",
            "staging_local_paths = [" + ", ".join(_toml_str(x) for x in local) + "]",
            f"cache_dir = {_toml_str(str(layout.mount_cache))}",
            f"state_dir = {_toml_str(str(layout.mount_state))}",
        ]
        write_atomic(layout.datalakefs_config, "\n".join(lines) + "\n")

    # ------------------------------------------------------------------------------------- postgres
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
                    raise DemoError(f"{spec.name} ({spec.description}) is not running; see {log}:\n{tail(log)}")
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
        CHILDREN.append(proc)
        return proc, log



def _toml_str(value: str) -> str:
    # a JSON string is a valid TOML basic string (same escapes)
    return json.dumps(value)
