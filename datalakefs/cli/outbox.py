"""``datalakefs outbox list|retry|cancel``: the upload queue of running mounts.

Talks to a daemon through its mount only: ``<mount>/.datalakefs/outbox.json`` for the list, and
writing ``retry`` or ``cancel`` into a file's ``user.datalakefs.state`` attribute for the actions.
A PATH names the mount it is under; without one, every running mount (the kernel's mount table) this
user can look into is listed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from datalakefs.cli.common import with_config
from datalakefs.errors import ConfigError
from datalakefs.fuse.session import mount_of, running_mounts

CONTROL = (".datalakefs", "outbox.json")
OUTBOX = ".outbox"
STATE_XATTR = "user.datalakefs.state"
_PENDING = ("writing", "queued", "uploading", "failed")


def outbox_document(mountpoint: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(mountpoint.joinpath(*CONTROL).read_text())
    return data


def pending_warning(mountpoint: Path) -> str | None:
    """What ``umount`` says when uploads are still pending (None when nothing is, or no daemon answers)."""
    try:
        summary = outbox_document(mountpoint)["summary"]
    except (OSError, ValueError, KeyError):
        return None
    counts = {state: int(summary.get(state, 0)) for state in _PENDING}
    if not sum(counts.values()):
        return None
    parts = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    return (f"datalakefs: warning: {parts} upload(s) ({summary.get('pending_bytes', 0)} bytes) pending in "
            f"{mountpoint}/{OUTBOX}; committed files are safe in the spool and their uploads resume at the "
            "next mount of this mount point")


def _mounts(args: argparse.Namespace) -> list[Path]:
    if args.mountpoint:
        mountpoint = mount_of(args.mountpoint)
        if mountpoint is None:
            raise ConfigError(f"{args.mountpoint} is not under a running datalakefs mount")
        return [mountpoint]
    return [m for m in running_mounts() if _may_enter(m)]


def _may_enter(mountpoint: Path) -> bool:
    """False for another user's mount (without allow_other, even root may not look in)."""
    try:
        os.stat(mountpoint)
    except PermissionError:
        return False
    return True


def cmd_list(args: argparse.Namespace) -> int:
    documents = {}
    for mount in _mounts(args):
        try:
            documents[str(mount)] = outbox_document(mount)
        except (OSError, ValueError) as exc:
            print(f"datalakefs: {mount}: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps(documents, indent=1, sort_keys=True))
        return 0
    for mount_name, document in documents.items():
        files = document["files"]
        print(f"{mount_name}: {len(files)} file(s) in the outbox")
        for entry in files:
            error = f"  ({entry['error']})" if entry["error"] else ""
            print(f"  {entry['state']:<9} {entry['size']:>12}  {mount_name}/{OUTBOX}/{entry['path']}{error}")
    return 0


def _act(command: str, args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths]
    if args.all_failed:
        for mount in _mounts(args):
            paths += [mount / OUTBOX / e["path"] for e in outbox_document(mount)["files"] if e["state"] == "failed"]
    failures = 0
    for path in paths:
        try:
            os.setxattr(path, STATE_XATTR, command.encode())
        except OSError as exc:
            print(f"datalakefs: {command} {path}: {exc.strerror}", file=sys.stderr)
            failures += 1
        else:
            print(f"{command}: {path}")
    return 1 if failures else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    outbox = sub.add_parser("outbox", help="the upload queue: list, retry or cancel uploads")
    actions = outbox.add_subparsers(dest="action", required=True)
    listing = with_config(actions.add_parser("list", help="files waiting in the outbox and their state"))
    listing.add_argument("mountpoint", nargs="?", metavar="PATH",
                         help="the mount PATH is under (default: every running mount)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)
    for command, text in (("retry", "upload failed files again now"), ("cancel", "drop files from the outbox")):
        action = with_config(actions.add_parser(command, help=text))
        action.add_argument("paths", nargs="*", help="outbox files (<mount>/.outbox/<scope>/<dataset>/<name>)")
        action.add_argument("--all-failed", action="store_true", help="every failed upload")
        action.add_argument("--mountpoint", metavar="PATH",
                            help="with --all-failed: the mount PATH is under (default: every running mount)")
        action.set_defaults(handler=lambda args, command=command: _act(command, args))
