"""Run Rucio's own daemons (judge, conveyor, reaper) in one process, in a loop (server venv).

The installed `rucio-conveyor-* --run-once` scripts each pay ~3 s of imports and sleep a hard-coded
partition_wait_time of 10 s before their single pass, so a rule would take half a minute. This
loop imports the same main functions (rucio.daemons.*) once and calls them with once=True and
partition_wait_time=0 every INTERVAL seconds: a rule from LAKE-ORIGIN to SCRATCH is OK about 2 s
after it was created. Daemon logic is untouched, with one exception: with once=True the repairer
would re-queue a STUCK rule at every pass (its delta becomes -1), so the rule would flicker between
STUCK and REPLICATING; here it waits --repair-after seconds after the rule's last update, like the
real daemon does with `[repairer] updated_at_delta` (1800 s in production).

Needs RUCIO_CONFIG pointing at the SERVER config (the daemons talk to the database directly) and
X509_USER_PROXY (the reaper deletes over WebDAV, whose protocol insists on a proxy file).
After every pass the mtime of --heartbeat is set, so `datalakefs demo status` can tell a live
loop from a wedged one. SIGTERM/SIGINT end the loop after the current daemon step.
"""

import argparse
import functools
import logging
import os
import signal
import sys
import time

import rucio.daemons.common as daemon_common
from rucio.daemons.conveyor import finisher, poller, submitter
from rucio.daemons.judge import cleaner, evaluator, injector, repairer
from rucio.daemons.reaper import reaper

LOG = logging.getLogger("demo-daemons")
STOP = False
REPAIR_AFTER = [30]


def _run_daemon_nowait(*args, **kwargs):
    # we are the only worker: no partition rebalancing wait
    kwargs["partition_wait_time"] = 0
    return daemon_common.run_daemon(*args, **kwargs)


def _run_daemon_repairer(*args, **kwargs):
    fnc = kwargs["run_once_fnc"]
    kwargs["run_once_fnc"] = functools.partial(fnc.func, *fnc.args, **{**fnc.keywords, "delta": REPAIR_AFTER[0]})
    return _run_daemon_nowait(*args, **kwargs)


for _module in (evaluator, injector, cleaner, reaper):
    _module.run_daemon = _run_daemon_nowait
repairer.run_daemon = _run_daemon_repairer

STEPS = (
    ("judge-injector", lambda: injector.rule_injector(once=True)),
    ("judge-evaluator", lambda: evaluator.re_evaluator(once=True, did_limit=1000)),
    ("conveyor-submitter", lambda: submitter.submitter(once=True, partition_wait_time=0, bulk=1000)),
    ("conveyor-poller", lambda: poller.poller(once=True, partition_wait_time=0, older_than=0, db_bulk=1000)),
    ("conveyor-finisher", lambda: finisher.finisher(once=True, partition_wait_time=0, db_bulk=1000)),
    ("judge-repairer", lambda: repairer.rule_repairer(once=True)),
    ("judge-cleaner", lambda: cleaner.rule_cleaner(once=True)),
    ("reaper", lambda: reaper.reaper(rses=[], include_rses=None, exclude_rses=None, once=True, greedy=True)),
)


def one_pass():
    timings = []
    for name, step in STEPS:
        if STOP:
            break
        started = time.perf_counter()
        try:
            step()
        except Exception:
            # the real daemons survive a failing iteration too
            LOG.exception("%s failed", name)
        timings.append((name, time.perf_counter() - started))
    return timings


def _stop(*_args):
    global STOP
    STOP = True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="one pass, print its timings, exit")
    parser.add_argument("-i", "--interval", type=float, default=1.0)
    parser.add_argument("--repair-after", type=int, default=30)
    parser.add_argument("--heartbeat", default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    REPAIR_AFTER[0] = args.repair_after
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not STOP:
        started = time.perf_counter()
        timings = one_pass()
        if args.heartbeat:
            with open(args.heartbeat, "a"):
                os.utime(args.heartbeat)
        if args.once:
            print(
                "pass %.2fs  " % (time.perf_counter() - started) + "  ".join("%s=%.2fs" % step for step in timings),
                flush=True,
            )
            return 0
        deadline = time.monotonic() + args.interval
        while not STOP and time.monotonic() < deadline:
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
