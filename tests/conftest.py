"""Session fixtures shared by every test directory: the real local data lake and its FTS knobs.

``lake`` starts the demo lake ONCE per pytest session (``datalakefs demo up`` in a subprocess, the
same code path as a user's), with state in ``$DATALAKEFS_TEST_STATE`` (default
``/var/tmp/datalakefs-test-lake``) and port base ``$DATALAKEFS_TEST_PORT_BASE`` (default 39000, so a
demo lake on 38000 is left alone). It yields the lake's :class:`LakeStatus` (seed roles, ports,
URLs, paths, rucio config), sets RUCIO_CONFIG and X509_USER_PROXY for the whole session, and runs
``down`` at the end, keeping the data so the next session starts warm. A lake that cannot start
fails the tests that need it; it is never skipped silently.

Tests marked ``lake_down`` stop and restart that same lake, so they are moved to the very end of
the session, after every test that uses the lake.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo.lake import Lake
from datalakefs.demo.processes import ProcessRecord, is_alive, read_record, start_time_of
from datalakefs.demo.status import Knobs, LakeStatus

TEST_STATE_DIR = Path(os.environ.get("DATALAKEFS_TEST_STATE") or "/var/tmp/datalakefs-test-lake")
TEST_PORT_BASE = int(os.environ.get("DATALAKEFS_TEST_PORT_BASE") or 39000)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lake_down: stops and restarts the session lake; runs after every other test")
    problem = installed_package_problem(Path(str(config.rootpath)))
    if problem:
        raise pytest.UsageError(problem)


def installed_package_problem(checkout: Path) -> str | None:
    """Why the ``datalakefs`` that tests import is not the installed package of this checkout, or None.

    The package sits at the repository root, which pytest puts on ``sys.path`` (``tests`` is a
    package). So an ``import datalakefs`` could succeed from the working directory alone, with no
    install, no entry points (``datalakefs``, ``mount.datalakefs``) and no package data, or come
    from another checkout's editable install. The tests run only when the imported package is the
    one the installed distribution provides, and an editable install points at this checkout.
    """
    import importlib.metadata
    from urllib.parse import unquote, urlparse

    import datalakefs

    imported = Path(datalakefs.__file__).resolve().parent
    try:
        dist = importlib.metadata.distribution("datalakefs")
    except importlib.metadata.PackageNotFoundError:
        return f"datalakefs is not installed in {sys.prefix}: run `make venv` (it imports from {imported})"
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        provided = Path(unquote(urlparse(direct_url["url"]).path)).resolve() / "datalakefs"
        if provided != (checkout / "datalakefs").resolve():
            return f"the editable install in {sys.prefix} is of {provided.parent}, not of this checkout {checkout}"
    else:
        provided = Path(str(dist.locate_file("datalakefs"))).resolve()
    if imported != provided:
        return f"tests import datalakefs from {imported}, but the installed package is {provided}"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("lake_down") is not None)


def demo(
    *args: str, state_dir: Path = TEST_STATE_DIR, port_base: int | None = TEST_PORT_BASE, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run ``datalakefs demo <args>`` for the test lake in a subprocess (never raises on failure)."""
    argv = [sys.executable, "-m", "datalakefs.demo.command", *args, "--state-dir", str(state_dir)]
    if port_base is not None:
        argv += ["--port-base", str(port_base)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def demo_ok(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Like :func:`demo`, but fail the test with the command's output when it does not succeed."""
    result = demo(*args, **kwargs)
    if result.returncode != 0:
        pytest.fail(
            f"datalakefs demo {' '.join(args)} failed with {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}",
            pytrace=False,
        )
    return result


@contextlib.contextmanager
def sessions_lock() -> Iterator[list[int]]:
    """Hold the test lake's session lock; yields the PIDs of the other live pytest sessions using it.

    Two pytest sessions (say a developer's and a clean checkout's) may share the test lake: each
    leaves a lease with its PID, and the last one out stops the lake. Creating a lease plus `up`,
    and checking the leases plus `down`, happen under this lock, so a session never stops the lake
    under another one.
    """
    sessions = TEST_STATE_DIR / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    with open(TEST_STATE_DIR / "sessions.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        others = []
        for lease in sessions.glob("*.json"):
            rec = read_record(lease)
            if rec is None or not is_alive(rec):
                lease.unlink(missing_ok=True)
            elif rec.pid != os.getpid():
                others.append(rec.pid)
        yield others


@pytest.fixture(scope="session")
def lake() -> Iterator[LakeStatus]:
    started = time.monotonic()
    lease = TEST_STATE_DIR / "sessions" / f"{os.getpid()}.json"
    with sessions_lock():
        start_time = start_time_of(os.getpid())
        assert start_time is not None
        lease.write_text(json.dumps(ProcessRecord(os.getpid(), start_time).to_json()))
        up = demo_ok("up")
    status = Lake(TEST_STATE_DIR).status()
    if not status.healthy or status.seed is None:
        pytest.fail(f"the test lake is not healthy after up:\n{up.stderr[-5000:]}", pytrace=False)
    print(f"\n[lake] up in {time.monotonic() - started:.1f} s ({TEST_STATE_DIR}, port base {TEST_PORT_BASE})")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in status.env.items():
            mp.setenv(key, value)
        yield status
    with sessions_lock() as others:
        lease.unlink(missing_ok=True)
        if others:
            print(f"\n[lake] left running for the other pytest sessions using it: {others}")
        else:
            demo_ok("down", port_base=None)


@pytest.fixture
def lake_alone(lake: LakeStatus) -> Iterator[None]:
    """For tests that stop the session lake: holds the session lock, skips if another session uses it."""
    with sessions_lock() as others:
        if others:
            pytest.skip(f"other pytest sessions use the test lake (pids {others}): stopping it would break them")
        yield


@pytest.fixture(scope="session")
def rucio_client(lake: LakeStatus) -> Any:
    """A rucio ``Client`` of the test lake's root account."""
    from rucio.client import Client

    return Client()


@pytest.fixture
def fts_knobs(lake: LakeStatus) -> Iterator[Callable[..., None]]:
    """``set_knobs(delay=0.0, fail=None)`` for the FTS shim; the knobs in force before are restored after."""
    control = Lake(lake.state_dir)
    before = control.read_knobs()

    def set_knobs(delay: float = 0.0, fail: str | None = None) -> None:
        control.write_knobs(Knobs(delay=delay, fail=fail))

    yield set_knobs
    control.write_knobs(before)


@pytest.fixture(scope="session")
def demo_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """:func:`demo`: run ``datalakefs demo ...`` on the test lake (or another state dir) in a subprocess."""
    return demo


def _hypothesis_profiles() -> None:
    """CI runs are derandomized (same examples every run, no example database), so a red CI is a
    regression and not a new random find; local runs keep searching and remember failures."""
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None, deadline=None)
    if os.environ.get("CI"):
        settings.load_profile("ci")


_hypothesis_profiles()
