"""Command line: ``datalakefs mount|umount|status|demo`` and the ``mount.datalakefs`` helper.

``mount`` without ``--foreground`` starts the daemon as a detached child and returns only once the
mount is usable (the child writes ``ready`` to a pipe), or prints why it failed. Each running mount
is recorded in ``<state_dir>/mounts/`` so that ``umount`` can wait for its daemon to finish.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from datalakefs import __version__
from datalakefs import config as configuration
from datalakefs.errors import DatalakeError

log = logging.getLogger("datalakefs")

READY_TIMEOUT_S = 120.0
# Options mount(8) passes to every helper; they mean nothing to datalakefs.
_MOUNT8_OPTIONS = frozenset({"rw", "ro", "defaults", "auto", "noauto", "user", "users", "nouser", "_netdev",
                             "nofail", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime",
                             "noatime", "relatime"})


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _registry_file(state_dir: Path, mountpoint: str) -> Path:
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return state_dir / "mounts" / f"{digest}.json"


def _load_config(args: argparse.Namespace) -> configuration.Config:
    overrides: dict[str, str] = {}
    for text in args.options or []:
        overrides.update(configuration.parse_mount_options(text))
    for key in _MOUNT8_OPTIONS & overrides.keys():
        del overrides[key]
    # fstab lines cannot pass --config: `-o config=FILE` names the file instead.
    config_file = overrides.pop("config", None) or args.config
    return configuration.load(config_file, overrides)


def cmd_mount(args: argparse.Namespace) -> int:
    config = _load_config(args)
    mountpoint = os.path.abspath(args.mountpoint)
    if args.foreground:
        return _run_foreground(config, mountpoint, args.ready_fd)
    return _mount_detached(args, config, mountpoint)


def _run_foreground(config: configuration.Config, mountpoint: str, ready_fd: int | None) -> int:
    from datalakefs import daemon

    _setup_logging(config.log_level)
    registry = _registry_file(config.state_dir, mountpoint)

    def on_ready() -> None:
        registry.parent.mkdir(parents=True, exist_ok=True)
        registry.write_text(json.dumps({"pid": os.getpid(), "mountpoint": mountpoint, "started": time.time()}))
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

    try:
        daemon.run(config, mountpoint, on_ready)
    except DatalakeError as exc:
        log.error("event=mount-failed mountpoint=%s reason=%s", mountpoint, exc)
        if ready_fd is not None:
            os.write(ready_fd, f"error: {exc}\n".encode())
        return 1
    finally:
        registry.unlink(missing_ok=True)
    return 0


def _mount_detached(args: argparse.Namespace, config: configuration.Config, mountpoint: str) -> int:
    logs = config.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{_registry_file(config.state_dir, mountpoint).stem}.log"
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "datalakefs", "mount", "--foreground", "--ready-fd", str(write_end),
               mountpoint]
    if args.config:
        command += ["--config", args.config]
    for text in args.options or []:
        command += ["-o", text]
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(command, pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=log_file,
                                 stderr=log_file, start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        answer = ready.readline().decode().strip()
    if answer == "ready":
        print(f"datalakefs: mounted {mountpoint} (pid {child.pid}, log {log_path})")
        return 0
    child.wait(timeout=READY_TIMEOUT_S)
    print(f"datalakefs: mount of {mountpoint} failed: {answer or 'the daemon exited'}", file=sys.stderr)
    print(f"datalakefs: see {log_path}", file=sys.stderr)
    return 1


def cmd_umount(args: argparse.Namespace) -> int:
    from datalakefs.fuse.session import MountError, is_stale, unmount

    config = _load_config(args)
    mountpoint = os.path.abspath(args.mountpoint)
    registry = _registry_file(config.state_dir, mountpoint)
    pid = json.loads(registry.read_text())["pid"] if registry.exists() else None
    try:
        unmount(mountpoint, lazy=is_stale(mountpoint))
    except MountError as exc:
        print(f"datalakefs: {exc}", file=sys.stderr)
        return 1
    if pid is not None:
        _wait_for_exit(pid, timeout=60.0)
    print(f"datalakefs: unmounted {mountpoint}")
    return 0


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def cmd_status(args: argparse.Namespace) -> int:
    config = _load_config(args)
    mounts = []
    for entry in sorted((config.state_dir / "mounts").glob("*.json")):
        record = json.loads(entry.read_text())
        status_path = Path(record["mountpoint"]) / ".datalakefs" / "status.json"
        try:
            record["status"] = json.loads(status_path.read_text())
        except (OSError, ValueError) as exc:
            record["error"] = str(exc)
        mounts.append(record)
    if args.json:
        print(json.dumps({"mounts": mounts}, indent=1))
    else:
        for record in mounts:
            state = "error: " + record["error"] if "error" in record else "up"
            print(f"{record['mountpoint']}  pid {record['pid']}  {state}")
        if not mounts:
            print("no datalakefs mounts")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from datalakefs.demo.command import main as demo_main

    return demo_main(args.demo_args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datalakefs", description="A Rucio data lake as a filesystem.")
    parser.add_argument("--version", action="version", version=f"datalakefs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML configuration file (default: $DATALAKEFS_CONFIG, "
                                        "~/.config/datalakefs/config.toml)")
        p.add_argument("-o", dest="options", action="append", metavar="KEY=VALUE,...",
                       help="override configuration options")
        return p

    mount = with_config(sub.add_parser("mount", help="mount the lake at MOUNTPOINT"))
    mount.add_argument("mountpoint")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.set_defaults(handler=cmd_mount)

    umount = with_config(sub.add_parser("umount", help="unmount MOUNTPOINT and wait for its daemon"))
    umount.add_argument("mountpoint")
    umount.set_defaults(handler=cmd_umount)

    status = with_config(sub.add_parser("status", help="show the running mounts"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    demo = sub.add_parser("demo", help="the local data lake (up, down, status, env, ...)", add_help=False)
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except DatalakeError as exc:
        print(f"datalakefs: {exc}", file=sys.stderr)
        return 2
    return code


def mount_helper_main(argv: list[str] | None = None) -> int:
    """``mount.datalakefs SOURCE DIR [-o OPTIONS]``, as mount(8) calls it for fstab lines.

    SOURCE is a configuration file when it names one, else only a label (e.g. ``datalakefs``).
    """
    parser = argparse.ArgumentParser(prog="mount.datalakefs")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append")
    parser.add_argument("-s", "-f", "-n", "-v", dest="ignored", action="count", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    command = ["mount", args.mountpoint]
    if os.path.isfile(args.source):
        command += ["--config", args.source]
    for text in args.options or []:
        command += ["-o", text]
    return main(command)


if __name__ == "__main__":
    sys.exit(main())
