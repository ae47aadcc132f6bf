"""``python -m bench [SUITE ...]``: run the suites (default: all of :data:`bench.SUITES`) and summarize."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from bench import SUITES
from bench.report import SuiteResult, failed_suite, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"suite modules to run (default: {' '.join(SUITES)})")
    args = parser.parse_args(argv)
    names = [name if name.startswith("bench.") else f"bench.{name}" for name in args.suites] or list(SUITES)
    results: list[SuiteResult] = []
    for name in names:
        try:
            results.append(importlib.import_module(name).run())
        except Exception:  # one broken suite must not lose the others' results
            traceback.print_exc()
            results.append(failed_suite(name.removeprefix("bench."), traceback.format_exc(limit=3)))
    paths = write_summary(results)
    print("summary: " + ", ".join(str(p) for p in paths))
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
