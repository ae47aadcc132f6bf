"""The mount-wide memory of storage endpoints a connection could not reach (transport/failover.py)."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from datalakefs.transport import failover
from datalakefs.transport.failover import Endpoints
from datalakefs.transport.http import FailureKind, RangeReadError
from datalakefs.transport.replicas import Candidate

XCACHE = Candidate("http://xcache.example:1094/LAKE/a.dat", "RSE", via_xcache=True)
XCACHE_OTHER_FILE = Candidate("http://xcache.example:1094/LAKE/b.dat", "RSE", via_xcache=True)
ORIGIN = Candidate("https://user:secret@origin.example/LAKE/a.dat", "RSE", via_xcache=False)
REFUSED = RangeReadError(FailureKind.CONNECTION, XCACHE.url, "[Errno 111] Connection refused")


def _run(clock: trio.testing.MockClock, check: object) -> None:
    trio.run(check, clock=clock)  # type: ignore[arg-type]


def test_an_unreachable_endpoint_is_tried_last_by_every_file_until_the_cool_down_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=failover.__name__)
    clock = trio.testing.MockClock()

    async def check() -> None:
        endpoints = Endpoints()
        assert endpoints.order((XCACHE, ORIGIN)) == (XCACHE, ORIGIN)
        endpoints.unreachable(XCACHE, REFUSED)
        endpoints.unreachable(XCACHE, REFUSED)  # a second file's failure: one warning in all
        # another file on the same endpoint is ordered after the origin; nothing is dropped
        assert endpoints.order((XCACHE_OTHER_FILE, ORIGIN)) == (ORIGIN, XCACHE_OTHER_FILE)
        clock.jump(failover.UNREACHABLE_FOR - 0.5)
        assert endpoints.order((XCACHE, ORIGIN)) == (ORIGIN, XCACHE)
        clock.jump(1)
        assert endpoints.order((XCACHE, ORIGIN)) == (XCACHE, ORIGIN)  # tried in its place again
        endpoints.reached(XCACHE)
        endpoints.unreachable(XCACHE, REFUSED)
        assert endpoints.order((XCACHE, ORIGIN)) == (ORIGIN, XCACHE)

    _run(clock, check)
    warnings = [r.getMessage() for r in caplog.records if "could not be reached" in r.getMessage()]
    assert len(warnings) == 2  # once when first marked, once after it answered and failed again
    assert warnings[0].startswith("http://xcache.example:1094 could not be reached")
    assert "answers again" in caplog.text


def test_the_endpoint_named_in_the_log_never_carries_user_info(caplog: pytest.LogCaptureFixture) -> None:
    async def check() -> None:
        Endpoints().unreachable(ORIGIN, RangeReadError(FailureKind.CONNECTION, ORIGIN.url, "refused"))

    _run(trio.testing.MockClock(), check)
    assert "https://origin.example could not be reached" in caplog.text
    assert "secret" not in caplog.text
