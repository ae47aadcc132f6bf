"""``datalakefs completion bash|zsh``: a shell completion script for every command and option.

The script is generated from the command line's own parser by ``shtab``, so it is complete and never
out of date; it is static, so completing costs no Python start. Install it the shell's way, e.g.

    datalakefs completion bash > ~/.local/share/bash-completion/completions/datalakefs
    datalakefs completion zsh > "${fpath[1]}/_datalakefs"
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

SHELLS = ("bash", "zsh")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             whole_parser: Callable[[], argparse.ArgumentParser]) -> None:
    completion = sub.add_parser("completion", help="print a shell completion script (bash, zsh)")
    completion.add_argument("shell", choices=SHELLS)

    def cmd_completion(args: argparse.Namespace) -> int:
        import shtab

        print(shtab.complete(whole_parser(), shell=args.shell))
        return 0

    completion.set_defaults(handler=cmd_completion)
