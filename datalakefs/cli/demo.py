"""``datalakefs demo ...``: the local data lake tooling (see datalakefs.demo)."""

from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:
    from datalakefs.demo.command import main as demo_main

    return demo_main(args.demo_args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="the local data lake (up, down, status, env, ...)", add_help=False)
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(handler=cmd_demo)
