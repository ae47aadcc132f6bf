"""``datalakefs status [--json]``: the running mounts and what their daemons report.

Mounts are found in the registry of the configured state dir and in the kernel's mount table
(``fuse.datalakefs``), so a mount made with another state dir is listed too. Each daemon's report is
its ``.datalakefs/status.json``, read with a timeout (a hung daemon is reported, never waited for).

The table knows the sections it can summarise (``content``, ``rates``, ``catalogue``,
``storage_auth``) and prints every other section generically: scalar fields as ``key value``, lists
of records one per line. Sections that services add later show up without a change here; a field
that is missing or of an unexpected type is skipped, never an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from datalakefs.cli.common import load_config, mount_config, registry_file, with_config
from datalakefs.cli.progress import human_bytes, human_duration
from datalakefs.errors import ConfigError
from datalakefs.fuse.session import running_mounts

READ_TIMEOUT_S = 5.0
_KNOWN = ("version", "mountpoint", "pid", "uptime_s", "content", "rates", "catalogue", "storage_auth", "metrics")
_LIST_SHOWN = 10


def read_status(mountpoint: str, timeout: float = READ_TIMEOUT_S) -> dict[str, Any]:
    """The daemon's status file, or ``{"error": why}``; never blocks longer than ``timeout``."""
    result: dict[str, Any] = {"error": f"the daemon did not answer within {timeout:.0f} s"}

    def read() -> None:
        nonlocal result
        try:
            data = json.loads((Path(mountpoint) / ".datalakefs" / "status.json").read_text())
            result = data if isinstance(data, dict) else {"error": "status.json is not an object"}
        except (OSError, ValueError) as exc:
            result = {"error": str(exc)}

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return result


def _registered(entry: Path) -> dict[str, Any] | None:
    """A mount's registry record (``mountpoint``, ``pid``, ``log``), or None when unreadable."""
    try:
        record = json.loads(entry.read_text())
        return {"mountpoint": str(record["mountpoint"]), "pid": record.get("pid"), "log": record.get("log")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def collect(state_dir: Path) -> list[dict[str, Any]]:
    """One record per mount: ``mountpoint``, ``pid``, ``log`` (where its daemon logs), ``status`` or
    ``error``. A mount of another state dir is found in the kernel's mount table; its registry record
    (pid, log) then comes from the state dir of its own configuration."""
    records: dict[str, dict[str, Any]] = {}
    for entry in sorted((state_dir / "mounts").glob("*.json")):
        record = _registered(entry)
        if record is not None:
            records[record["mountpoint"]] = record
    for running in running_mounts():
        records.setdefault(str(running), {"mountpoint": str(running), "pid": None, "log": None})
    for mountpoint, record in records.items():
        status = read_status(mountpoint)
        if "error" in status and len(status) == 1:
            record["error"] = status["error"]
            continue
        record["status"] = status
        if record["log"] is None:
            with contextlib.suppress(ConfigError):
                own = _registered(registry_file(mount_config(Path(mountpoint)).state_dir, mountpoint))
                record.update(own or {})
        record["pid"] = record["pid"] or status.get("pid")
    return sorted(records.values(), key=lambda r: str(r["mountpoint"]))


# ---- rendering ------------------------------------------------------------------------------------


def _num(data: Any, *path: str) -> float | None:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return float(data) if isinstance(data, int | float) and not isinstance(data, bool) else None


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "-"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _flat(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            yield f"{prefix}{key}", value


def _generic(value: Any) -> list[str]:
    """Lines for a section nobody told this module about."""
    if isinstance(value, Mapping):
        scalars = [f"{key} {_scalar(v)}" for key, v in _flat(value)]
        lines = [", ".join(scalars)] if scalars else []
        for key, inner in value.items():
            if isinstance(inner, list):
                lines.append(f"{key}: {len(inner)}")
                lines += ["  " + line for line in _records(inner)]
        return lines or ["(empty)"]
    if isinstance(value, list):
        return [f"{len(value)} entries", *("  " + line for line in _records(value))]
    return [_scalar(value)]


def _records(items: Sequence[Any]) -> list[str]:
    lines = []
    for item in items[:_LIST_SHOWN]:
        if isinstance(item, Mapping):
            lines.append("  ".join(f"{k}={_scalar(v)}" for k, v in _flat(item)))
        else:
            lines.append(_scalar(item))
    if len(items) > _LIST_SHOWN:
        lines.append(f"... and {len(items) - _LIST_SHOWN} more")
    return lines


def _cache_line(content: Any) -> str | None:
    used, capacity = _num(content, "cache", "used_bytes"), _num(content, "cache", "capacity")
    if used is None:
        return None
    text = human_bytes(used)
    if capacity:
        text += f" of {human_bytes(capacity)} ({100 * used / capacity:.0f}%)"
    files = _num(content, "cache", "files")
    if files is not None:
        text += f", {files:.0f} files"
    rate = _num(content, "hit_rate")
    if rate is not None:
        text += f", hit rate {100 * rate:.1f}%"
    return text


def _transfers_line(content: Any, rates: Any) -> str | None:
    in_flight = _num(content, "transfers_in_flight")
    if in_flight is None:
        return None
    text = f"{in_flight:.0f} in flight"
    speed = _num(rates, "bytes_fetched_per_s")
    if speed is not None:
        text += f", {human_bytes(speed)}/s"
    requests = _num(rates, "requests_per_s")
    if requests is not None:
        text += f", {requests:g} requests/s"
    total, failed = _num(content, "requests"), _num(content, "failed_requests")
    if total is not None:
        text += f"; {total:.0f} requests, {failed or 0:.0f} failed, {human_bytes(_num(content, 'bytes_fetched') or 0)}"
    return text


def _catalogue_line(catalogue: Any) -> str | None:
    if not isinstance(catalogue, Mapping):
        return None
    calls = catalogue.get("calls")
    total = sum(v for v in calls.values() if isinstance(v, int)) if isinstance(calls, Mapping) else 0
    text = f"{total} calls, {_scalar(catalogue.get('hits'))} hits, {_scalar(catalogue.get('misses'))} misses"
    if catalogue.get("last_error"):
        text += f"; last error: {_scalar(catalogue['last_error'])}"
    return text


def _auth_line(auth: Any) -> str | None:
    if not isinstance(auth, Mapping):
        return None
    text = f"bearer token {_scalar(auth.get('bearer_token'))}"
    if auth.get("x509_proxy"):
        text += f", x509 proxy {auth['x509_proxy']}"
    return text


def render_mount(record: Mapping[str, Any]) -> list[str]:
    head = f"{record['mountpoint']}"
    if record.get("pid"):
        head += f"  pid {record['pid']}"
    if "error" in record:
        return [head + f"  NOT ANSWERING: {record['error']}"]
    status = record.get("status") or {}
    head += "  up"
    log_line = [("log", [str(record["log"])])] if record.get("log") else []
    uptime = _num(status, "uptime_s")
    if uptime is not None:
        head += f" {human_duration(uptime)}"
    if status.get("version"):
        head += f"  datalakefs {status['version']}"
    rows: list[tuple[str, list[str]]] = list(log_line)
    content = status.get("content")
    for label, line in (
        ("cache", _cache_line(content)),
        ("transfers", _transfers_line(content, status.get("rates"))),
        ("catalogue", _catalogue_line(status.get("catalogue"))),
        ("storage auth", _auth_line(status.get("storage_auth"))),
    ):
        if line is not None:
            rows.append((label, [line]))
    metrics = status.get("metrics")
    if isinstance(metrics, Mapping) and metrics.get("url"):
        rows.append(("metrics", [str(metrics["url"])]))
    for section, value in status.items():
        if section not in _KNOWN:
            rows.append((section.replace("_", " "), _generic(value)))
    width = max((len(label) for label, _ in rows), default=0)
    lines = [head]
    for label, texts in rows:
        lines.append(f"  {label:<{width}}  {texts[0]}")
        lines += [f"  {'':<{width}}  {text}" for text in texts[1:]]
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args)
    mounts = collect(config.state_dir)
    if args.mountpoints:
        wanted = {os.path.abspath(m) for m in args.mountpoints}
        mounts = [r for r in mounts if os.path.abspath(str(r["mountpoint"])) in wanted]
    if args.json:
        print(json.dumps({"mounts": mounts}, indent=1, sort_keys=True))
        return 0
    if not mounts:
        print("no datalakefs mounts")
        return 0
    blocks = ["\n".join(render_mount(record)) for record in mounts]
    print("\n\n".join(blocks))
    return 0 if all("error" not in r for r in mounts) else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = with_config(sub.add_parser("status", help="show the running mounts: cache, transfers, queues"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("mountpoints", nargs="*", metavar="MOUNTPOINT", help="only these mounts (default: all)")
    status.set_defaults(handler=cmd_status)

