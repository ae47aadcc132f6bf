"""`datalakefs demo ...`: bring the local data lake up and down, report it, mount it, tune it.

    up [--with-100k] [--no-seed]     start what is not running, seed what is not seeded
    down                             unmount, stop every process by PID, check no port is left open
    status [--json]                  services (pid, port, healthy), config paths, mount, seed roles
    env                              shell exports to use the lake with the rucio CLI
    rucio-cfg --x509 | --x509-proxy  a rucio.cfg for certificate (or proxy) auth at the TLS front
    knobs [--delay S] [--fail RE | --clear]   FTS shim test knobs, changed while the lake runs
    token [--scope S] [--expired | --wrong-key] [--lifetime S]   a bearer token of the lake's issuer
    mount MOUNTPOINT                 datalakefs mount --config <state>/etc/datalakefs.toml MOUNTPOINT
    tour MOUNTPOINT                  what to try on a mounted lake

Every subcommand takes ``--state-dir DIR`` (default ``$DATALAKEFS_DEMO_STATE`` or ``./.demo``) and
``--port-base N`` (default: the one the state directory was last brought up with, else 38000).
Progress goes to stderr, results to stdout; exit status 0 on success, 1 on a failure whose
message says what to do, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from datalakefs.demo.lake import Lake
from datalakefs.demo.layout import DEFAULT_PORT_BASE, STATE_ENV, DemoError, default_state_dir
from datalakefs.demo.processes import (
    ProcessRecord,
    datalakefs_executable,
    is_mounted,
    mount_answers,
    start_time_of,
)
from datalakefs.demo.status import Knobs, LakeStatus
from datalakefs.demo.tokens import DEFAULT_SCOPE, mint, write_user_token
from datalakefs.errors import ConfigError


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"state directory of the lake (default ${STATE_ENV} or ./.demo)",
    )
    common.add_argument(
        "--port-base",
        type=int,
        default=None,
        help=f"first port; every service is at a fixed offset (default {DEFAULT_PORT_BASE})",
    )
    parser = argparse.ArgumentParser(
        prog="datalakefs demo", description="The local data lake: Rucio, XRootD, XCache, WebDAV, FTS shim."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="start the lake (idempotent) and seed it")
    up.add_argument("--with-100k", action="store_true", help="also seed a 100,000-file dataset (slow)")
    up.add_argument("--no-seed", action="store_true", help="start the services only")
    sub.add_parser("down", parents=[common], help="stop every process of the lake, unmount its mount")
    status = sub.add_parser("status", parents=[common], help="report services, paths and seed roles")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("env", parents=[common], help="print shell exports for the rucio CLI")
    rucio_cfg = sub.add_parser("rucio-cfg", parents=[common], help="print a rucio.cfg for x509 or x509_proxy auth")
    auth = rucio_cfg.add_mutually_exclusive_group(required=True)
    auth.add_argument("--x509", action="store_true", help="the demo user certificate and key")
    auth.add_argument("--x509-proxy", action="store_true", help="an RFC 3820 proxy of the demo user certificate")
    knobs = sub.add_parser("knobs", parents=[common], help="show or set the FTS shim's test knobs")
    knobs.add_argument("--delay", type=float, default=None, help="seconds to wait before each file copy")
    which = knobs.add_mutually_exclusive_group()
    which.add_argument("--fail", default=None, metavar="REGEX", help="fail transfers whose URL matches")
    which.add_argument("--clear", action="store_true", help="no delay, no forced failure")
    token = sub.add_parser("token", parents=[common], help="print a bearer token for the protected storage")
    token.add_argument(
        "--scope",
        default=DEFAULT_SCOPE,
        help=f"WLCG scopes, space-separated, paths relative to the RSE tree (default {DEFAULT_SCOPE!r})",
    )
    kind = token.add_mutually_exclusive_group()
    kind.add_argument("--expired", action="store_true", help="a token that expired an hour ago")
    kind.add_argument("--wrong-key", action="store_true", help="a token signed by an unknown key")
    token.add_argument("--lifetime", type=int, default=3600, help="seconds the token is valid (default 3600)")
    mount = sub.add_parser("mount", parents=[common], help="mount the lake with datalakefs")
    mount.add_argument("mountpoint", type=Path)
    tour = sub.add_parser("tour", parents=[common], help="print things to try on the mounted lake")
    tour.add_argument("mountpoint", type=Path)
    return parser


def _lake(args: argparse.Namespace) -> Lake:
    state_dir = args.state_dir if args.state_dir is not None else default_state_dir()
    return Lake(state_dir, args.port_base)


def cmd_up(lake: Lake, args: argparse.Namespace) -> int:
    started = time.monotonic()
    lake.up(_progress)
    if not args.no_seed:
        # rucio reads its config location once, at first use: set it before importing the client
        os.environ.update(lake.client_env())
        for key in ("no_proxy", "NO_PROXY"):
            os.environ[key] = ",".join(filter(None, [os.environ.get(key), "127.0.0.1", "localhost"]))
        from datalakefs.demo import seed

        seed.run(lake, with_100k=args.with_100k, progress=_progress)
    _progress(f"[up {time.monotonic() - started:6.2f}s] ready; `datalakefs demo env` prints the client environment")
    return 0


def cmd_down(lake: Lake, _args: argparse.Namespace) -> int:
    lake.down(_progress)
    return 0


def _render_status(st: LakeStatus) -> str:
    lines = [f"lake {st.state_dir} (port base {st.port_base}): {'healthy' if st.healthy else 'NOT healthy'}"]
    for svc in st.services.values():
        ports = ", ".join(f"{k}={v}" for k, v in svc.ports.items()) or "-"
        pid = svc.pid if svc.pid is not None else "-"
        lines.append(f"  {svc.name:<11} {'ok  ' if svc.healthy else 'DOWN'} pid {pid!s:<8} {ports}")
    lines.append(f"  rucio config      {st.rucio_config}")
    lines.append(f"  datalakefs config {st.datalakefs_config}")
    if st.x509 is not None:
        lines.append(f"  x509 auth         {st.x509.auth_host} (datalakefs demo rucio-cfg --x509|--x509-proxy)")
    mount = "-" if st.mountpoint is None else f"{st.mountpoint} ({'mounted' if st.mounted else 'not mounted'})"
    lines.append(f"  mount             {mount}")
    knobs = st.knobs
    lines.append(f"  fts knobs         delay={knobs.delay:g}s fail={knobs.fail or '-'}")
    if st.seed is None:
        lines.append("  seed              (not seeded)")
    else:
        seed = st.seed
        lines.append(f"  seed v{seed.version}          scopes {', '.join(seed.scopes)}")
        for role in (
            "container",
            "big_file",
            "dataset_10k",
            "dataset_100k",
            "stage_dataset",
            "cross_scope_dataset",
            "escaped_dataset",
            "multi_dataset_file",
        ):
            lines.append(f"    {role:<20} {getattr(seed, role)}")
        lines.append(f"    {'metadata_dataset':<20} {seed.metadata_dataset.did} {dict(seed.metadata_dataset.metadata)}")
    return "\n".join(lines)


def cmd_status(lake: Lake, args: argparse.Namespace) -> int:
    st = lake.status()
    if args.json:
        print(json.dumps(st.to_json(), indent=1))
    else:
        print(_render_status(st))
    return 0


def cmd_env(lake: Lake, _args: argparse.Namespace) -> int:
    for key, value in lake.client_env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_rucio_cfg(lake: Lake, args: argparse.Namespace) -> int:
    if not lake.layout.x509.proxy.exists():
        raise DemoError("the lake has no X.509 credentials yet: run `datalakefs demo up` first")
    print(lake.x509_rucio_config(proxy=args.x509_proxy), end="")
    return 0


def cmd_knobs(lake: Lake, args: argparse.Namespace) -> int:
    current = lake.read_knobs()
    if args.clear:
        current = Knobs()
    if args.delay is not None or args.fail is not None:
        current = Knobs(
            delay=current.delay if args.delay is None else args.delay,
            fail=current.fail if args.fail is None else (args.fail or None),
        )
    if args.clear or args.delay is not None or args.fail is not None:
        lake.write_knobs(current)
    print(json.dumps(current.to_json()))
    return 0


def cmd_token(lake: Lake, args: argparse.Namespace) -> int:
    extra = ["--scope", args.scope, "--lifetime", str(args.lifetime)]
    extra += ["--expired"] if args.expired else ["--wrong-key"] if args.wrong_key else []
    print(mint(lake.layout, *extra))
    return 0


def cmd_mount(lake: Lake, args: argparse.Namespace) -> int:
    mountpoint = args.mountpoint.expanduser().absolute()
    if is_mounted(mountpoint):
        raise DemoError(f"{mountpoint} is already a mount point")
    if not lake.layout.datalakefs_config.exists():
        raise DemoError(f"{lake.layout.datalakefs_config} does not exist: run `datalakefs demo up` first")
    mountpoint.mkdir(parents=True, exist_ok=True)
    # the mount presents a WLCG token (the demo proxy, in client_env, is its fallback): the doors
    # of the lake refuse anonymous changes
    write_user_token(lake.layout)
    env = {**os.environ, **lake.client_env(), "BEARER_TOKEN_FILE": str(lake.layout.user_token)}
    exe = datalakefs_executable()
    if exe is None:
        raise DemoError("the datalakefs command is not installed (pip install -e . in the project venv)")
    # in the foreground, so the daemon is our child with a known PID that `down` can stop
    argv = [exe, "mount", "--foreground", "--config", str(lake.layout.datalakefs_config), str(mountpoint)]
    proc, log = lake.spawn_mount(argv, env)
    deadline = time.monotonic() + 60
    while not is_mounted(mountpoint):
        if proc.poll() is not None:
            raise DemoError(f"`{shlex.join(argv)}` exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise DemoError(f"{mountpoint} was not mounted after 60 s; see {log}")
        time.sleep(0.1)
    start = start_time_of(proc.pid)
    rec = None if start is None else ProcessRecord(proc.pid, start)
    lake.record_mount(mountpoint, rec)
    # mounted is not yet serving: a stat through the mount proves the daemon answers
    if not mount_answers(mountpoint, timeout=30):
        raise DemoError(f"{mountpoint} is mounted but does not answer; see {log}; `datalakefs demo down` cleans up")
    _progress(f"mounted the lake at {mountpoint}")
    return 0


def _program_as_typed() -> str:
    """How a shell in this directory reaches this program: ``datalakefs`` when that name finds it on
    the PATH, else its path (``.venv/bin/datalakefs`` after ``make demo``, which does not put the venv on
    the user's PATH), so that the tour runs as pasted."""
    program = Path(sys.executable).parent / "datalakefs"
    on_path = shutil.which("datalakefs")
    if not program.exists() or (on_path is not None and os.path.samefile(on_path, program)):
        return "datalakefs"
    relative = os.path.relpath(program)
    return shlex.quote(str(program) if relative.startswith("..") else relative)


def cmd_tour(lake: Lake, args: argparse.Namespace) -> int:
    seed = lake.read_seed()
    if seed is None:
        raise DemoError("the lake is not seeded: run `datalakefs demo up` first")
    m = shlex.quote(str(args.mountpoint))
    dlfs = _program_as_typed()

    def path(did: str) -> str:
        scope, name = did.split(":", 1)
        return f"{m}/{scope}/{name}"

    sized_dir = path(seed.sized_dataset)
    one_mib = path(seed.sized_files[1 << 20])
    meta = seed.metadata_query
    steps = [
        (f"ls {m}", "one directory per scope"),
        (f"ls {path(seed.container)}", "a container: its datasets, other scopes as scope:name"),
        (f"ls -l {sized_dir}", "0 B to 1 GiB, sizes from the catalogue, no data read"),
        (f"getfattr -d {one_mib}", "scope, name, checksums, replicas, cache state"),
        (f"md5sum {one_mib}", "streams 1 MiB; compare with user.rucio.md5"),
        (f"dd if={path(seed.big_file)} of=/dev/null bs=1M count=64", "range reads through XCache"),
        (f"ls {path(seed.dataset_10k)} | wc -l", "a 10,000-file dataset"),
        (f"ls {m}/.query/{meta.scope}/{shlex.quote(meta.filter)}/", "a metadata query as a directory"),
        (f"{dlfs} stage {path(seed.stage_dataset)} --wait", "one replication rule to SCRATCH, with progress"),
        (f"getfattr -n user.datalakefs.state {path(seed.stage_dataset)}", "the rule's state and locks"),
        (f"mkdir -p {m}/.outbox/{seed.upload_scope}/my_results", "a dataset to upload into"),
        (f"cp /etc/hostname {m}/.outbox/{seed.upload_scope}/my_results/",
         "close() = durable; then uploaded to SCRATCH"),
        (f"{dlfs} outbox list", "what waits for upload, and why"),
        (f"ls {m}/{seed.upload_scope}/my_results/", "the uploaded file, once done"),
        (f"{dlfs} status {m}", "cache, transfers, rules, outbox queue"),
        (f"cat {m}/.datalakefs/status.json", "the daemon's state as JSON"),
    ]
    width = max(len(cmd) for cmd, _ in steps)
    print("\n".join(f"{cmd:<{width}}  # {why}" for cmd, why in steps))
    return 0


COMMANDS = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "env": cmd_env,
    "rucio-cfg": cmd_rucio_cfg,
    "knobs": cmd_knobs,
    "token": cmd_token,
    "mount": cmd_mount,
    "tour": cmd_tour,
}


def main(argv: Sequence[str]) -> int:
    """Run one `datalakefs demo` subcommand; ``argv`` excludes the program name and "demo"."""
    args = _parser().parse_args(list(argv))
    try:
        return COMMANDS[args.command](_lake(args), args)
    except (DemoError, ConfigError) as exc:
        print(f"datalakefs demo {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
