"""``datalakefs status``: the running mounts and what their daemons report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datalakefs.cli.common import load_config, with_config


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args)
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



def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = with_config(sub.add_parser("status", help="show the running mounts"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)
