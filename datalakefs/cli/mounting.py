"""``datalakefs mount|umount`` and the ``mount.datalakefs`` helper.

``mount`` without ``--foreground`` starts the daemon as a detached child and returns only once the
mount is usable (the child writes ``ready`` to a pipe), or prints why it failed. Each running mount
is recorded in ``<state_dir>/mounts/`` so that ``umount`` can wait for its daemon to finish.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from datalakefs import config as configuration
from datalakefs.cli.common import load_config, registry_file, setup_logging, with_config
from datalakefs.cli.logs import log_destination
from datalakefs.cli.outbox import pending_warning
from datalakefs.errors import ConfigError, DatalakeError
from datalakefs.ops.private import keep_private

log = logging.getLogger("datalakefs")

READY_TIMEOUT_S = 120.0





def cmd_mount(args: argparse.Namespace) -> int:
    config = load_config(args)
    keep_private(config.state_dir)
    mountpoint = os.path.abspath(args.mountpoint)
    if args.foreground:
        return _run_foreground(config, mountpoint, args.ready_fd)
    return _mount_detached(args, config, mountpoint)


def _daemon_module() -> ModuleType:
    """The daemon, which needs the FUSE binding (the ``fuse`` extra); its absence is a clear error."""
    try:
        from datalakefs import daemon
    except ModuleNotFoundError as exc:
        if exc.name != "pyfuse3":
            raise
        raise ConfigError("mounting needs pyfuse3, which is not installed: pip install 'datalakefs[fuse]' "
                          "(it builds against libfuse3-dev)") from None
    return daemon


def _run_foreground(config: configuration.Config, mountpoint: str, ready_fd: int | None) -> int:
    registry = registry_file(config.state_dir, mountpoint)

    def on_ready() -> None:
        registry.parent.mkdir(parents=True, exist_ok=True)
        registry.write_text(json.dumps({"pid": os.getpid(), "mountpoint": mountpoint, "started": time.time(),
                                        "log": log_destination()}))
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

    try:
        setup_logging(config.log_level)
        _daemon_module().run(config, mountpoint, on_ready)
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
    log_path = logs / f"{registry_file(config.state_dir, mountpoint).stem}.log"
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

    config = load_config(args)
    mountpoint = os.path.abspath(args.mountpoint)
    registry = registry_file(config.state_dir, mountpoint)
    pid = json.loads(registry.read_text())["pid"] if registry.exists() else None
    warning = None if is_stale(mountpoint) else pending_warning(Path(mountpoint))
    if warning:
        print(warning, file=sys.stderr)
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
    from datalakefs.cli.progress import Progress
    from datalakefs.fuse.session import wait_gone

    with Progress(f"waiting for the daemon (pid {pid}) to finish", unit="") as progress:
        wait_gone(pid, timeout, tick=lambda: progress.update(0))


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
    from datalakefs.cli import main

    return main(command)


class _AsOption(argparse.Action):
    """``--cache-dir DIR`` as ``-o cache_dir=DIR``: the flag forms rclone and mount-s3 users type."""

    def __init__(self, option_strings: list[str], dest: str, key: str, **kwargs: Any) -> None:
        super().__init__(option_strings, "options", **kwargs)
        self.key = key

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if "," in str(values):
            parser.error(f"{option_string}: {values!r} contains a comma; set it in the --config file instead")
        namespace.options = [*(namespace.options or []), f"{self.key}={values}"]


def _mount_flags(mount: argparse.ArgumentParser) -> None:
    flags = mount.add_argument_group("common options as flags (each is the same as its -o form)")
    flags.add_argument("--read-only", dest="options", action="append_const", const="ro",
                       help="a read-only mount, without .outbox (-o ro)")
    flags.add_argument("--allow-other", dest="options", action="append_const", const="allow_other",
                       help="let other users in; the kernel checks modes (-o allow_other)")
    for flag, key, metavar, text in (
        ("--cache-dir", "cache_dir", "DIR", "the block cache's directory"),
        ("--cache-size", "cache_size", "SIZE", "the block cache's size, e.g. 20G"),
        ("--uid", "uid", "UID", "owner of every file"),
        ("--gid", "gid", "GID", "group of every file"),
        ("--umask", "umask", "MASK", "permission bits to remove, octal (022)"),
    ):
        flags.add_argument(flag, action=_AsOption, key=key, metavar=metavar, help=f"{text} (-o {key}=...)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mount = with_config(sub.add_parser("mount", help="mount the lake at MOUNTPOINT"))
    mount.add_argument("mountpoint")
    _mount_flags(mount)
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.set_defaults(handler=cmd_mount)

    umount = with_config(sub.add_parser("umount", help="unmount MOUNTPOINT and wait for its daemon"))
    umount.add_argument("mountpoint")
    umount.set_defaults(handler=cmd_umount)


