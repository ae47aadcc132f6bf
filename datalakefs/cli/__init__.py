"""Command line: ``datalakefs <command>``; each command group lives in a module of this package
with a ``register(subparsers)`` function, listed in :data:`COMMAND_MODULES`."""

from __future__ import annotations

import argparse
import sys

from datalakefs import __version__
from datalakefs.cli import cache, completion, demo, mounting, outbox, stage, status
from datalakefs.cli.mounting import mount_helper_main
from datalakefs.errors import DatalakeError

COMMAND_MODULES = (mounting, status, stage, outbox, cache, demo)

__all__ = ["main", "mount_helper_main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datalakefs", description="A Rucio data lake as a filesystem.")
    parser.add_argument("--version", action="version", version=f"datalakefs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    completion.register(sub, _parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # the demo tooling parses its own arguments, --help included
        return demo.run(argv[1:])
    args = _parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except DatalakeError as exc:
        print(f"datalakefs: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
