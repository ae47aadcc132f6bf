"""``datalakefs stage PATH|DID [--wait]``: one replication rule that brings a file, dataset or container
to the staging RSE, and (with ``--wait``) its progress until every lock is OK.

A PATH under a datalakefs mount is resolved to its DID through the ``user.rucio.scope`` and
``user.rucio.name`` attributes, and the command uses that mount's configuration (``-o`` still applies on
top; ``--config`` replaces it); anything else is read as ``scope:name`` with the configuration of
``--config``/``$DATALAKEFS_CONFIG``. The rule is made with the
rucio client of the configuration (``rucio_config``) and the staging options (``staging_rse``,
``rule_lifetime``, ``rule_activity``, ``rule_account``); the account's existing rule for the same DID
and RSE is reused. In a terminal the progress is a bar (locks OK / total, bytes); otherwise one line
per change. Exit status: 0 when the rule is OK (or when not waiting), 1 when it is STUCK (the reason
is printed) or did not finish within ``--timeout``, 2 for a bad target or configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TextIO

from datalakefs.catalogue.rucio import RucioCatalogue
from datalakefs.cli.common import load_config, setup_logging, with_config
from datalakefs.config import duration
from datalakefs.errors import ConfigError, InvalidNameError, NotFoundError
from datalakefs.model import DID, Lock, LockState, Rule, RuleState

POLL_MIN = 0.5
POLL_MAX = 5.0
BAR_WIDTH = 30


def resolve_target(target: str) -> DID:
    """The DID of a path under a mount (from its xattrs), else ``target`` parsed as ``scope:name``."""
    if os.path.lexists(target):
        try:
            scope = os.getxattr(target, "user.rucio.scope").decode()
            name = os.getxattr(target, "user.rucio.name").decode()
        except OSError as exc:
            raise NotFoundError(f"{target} is not a DID under a datalakefs mount ({exc.strerror})") from None
        return DID(scope, name)
    try:
        return DID.parse(target)
    except ValueError:
        raise InvalidNameError(f"{target!r} is neither an existing path nor scope:name") from None


def _size(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    return str(value)


def progress_line(rule: Rule, locks: list[Lock], tty: bool) -> str:
    ok = sum(1 for lock in locks if lock.state is LockState.OK)
    total = len(locks) or rule.locks_total
    done_bytes = sum(lock.size for lock in locks if lock.state is LockState.OK)
    all_bytes = sum(lock.size for lock in locks)
    text = f"{ok}/{total} locks OK, {_size(done_bytes)} of {_size(all_bytes)}, {rule.state.value}"
    if rule.locks_stuck:
        text += f", {rule.locks_stuck} stuck"
    if not tty:
        return text
    filled = BAR_WIDTH * ok // total if total else BAR_WIDTH
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"


def wait_for(catalogue: RucioCatalogue, rule: Rule, timeout: float | None, out: TextIO) -> Rule:
    """Poll the rule until OK or STUCK (or ``timeout``), drawing the progress on ``out``."""
    tty = out.isatty()
    deadline = None if timeout is None else time.monotonic() + timeout
    interval = POLL_MIN
    shown = ""
    while True:
        locks = catalogue.rule_locks(rule)
        line = progress_line(rule, locks, tty)
        if line != shown:
            out.write(f"\r\x1b[K{line}" if tty else f"{line}\n")
            out.flush()
            shown = line
        if rule.state in (RuleState.OK, RuleState.STUCK):
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
        interval = min(interval * 1.5, POLL_MAX)
        rule = catalogue.get_rule(rule.id)
    if tty:
        out.write("\n")
    return rule


def cmd_stage(args: argparse.Namespace) -> int:
    config = load_config(args, under=args.target)
    setup_logging("WARNING")
    if not config.staging_rse:
        raise ConfigError("option staging_rse: `datalakefs stage` needs a staging RSE")
    did = resolve_target(args.target)
    catalogue = RucioCatalogue(config)
    try:
        collection = catalogue.get_info(did).type.is_collection
        rule, created = catalogue.add_rule(did, config.staging_rse, config.rule_lifetime or None,
                                           config.rule_activity, config.rule_account, asynchronous=collection)
        print(f"{'created' if created else 'reusing'} rule {rule.id}: {did} -> {config.staging_rse} "
              f"({rule.state.value}, {rule.locks_ok}/{rule.locks_total} locks OK)", flush=True)
        if not args.wait:
            return 0
        rule = wait_for(catalogue, rule, args.timeout, sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; the rule goes on", file=sys.stderr)
        return 130
    finally:
        catalogue.close()
    if rule.state is RuleState.OK:
        print(f"rule {rule.id} OK: {rule.locks_ok}/{rule.locks_total} locks OK")
        return 0
    if rule.state is RuleState.STUCK:
        print(f"rule {rule.id} STUCK: {rule.locks_stuck} of {rule.locks_total} locks stuck: "
              f"{rule.error or 'no reason given'}", file=sys.stderr)
        return 1
    print(f"rule {rule.id} still {rule.state.value} after {args.timeout} s "
          f"({rule.locks_ok}/{rule.locks_total} locks OK)", file=sys.stderr)
    return 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stage = with_config(sub.add_parser(
        "stage", help="replicate a file, dataset or container to the staging RSE with one rule"))
    stage.add_argument("target", metavar="PATH|DID", help="a path under a mount, or scope:name")
    stage.add_argument("--wait", action="store_true", help="show progress until every lock is OK")
    stage.add_argument("--timeout", type=duration, default=None,
                       help="with --wait: give up after this long (seconds, or 30s, 5m, 2h)")
    stage.set_defaults(handler=cmd_stage)
