"""``datalakefs demo ...``: the local data lake tooling (see datalakefs.demo).

The demo tooling has its own parser; :func:`datalakefs.cli.main` hands it every argument after
``demo`` (``--help`` included), so the entry here only lists the command in ``datalakefs --help``.
"""

from __future__ import annotations

import argparse


def run(argv: list[str]) -> int:
    from datalakefs.demo.command import main as demo_main

    return demo_main(argv)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser("demo", help="the local data lake (up, down, status, env, mount, tour, ...)", add_help=False)
