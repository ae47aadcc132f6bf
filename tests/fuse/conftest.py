"""Real mounts of the test lake: one shared read-only mount per session, and fresh ones on demand."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from datalakefs.demo.status import LakeStatus
from datalakefs.fuse.session import mounted_fstype, unmount
from tests.fuse.mounting import Mount
from tests.fuse.tcpproxy import TcpProxy
from tests.fuse.users import TestUser, fuse_problem, unprivileged_user


@pytest.fixture(scope="session")
def lake_mount(lake: LakeStatus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("session-mount")
    mount = Mount(base / "lake", lake.datalakefs_config, f"cache_dir={base / 'cache'}",
                  f"state_dir={base / 'state'}")
    with mount:
        yield mount


@pytest.fixture
def new_mount(lake: LakeStatus, tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """``new_mount(*options, config=None)``: a mount of its own for one test, undone afterwards."""
    mounts: list[Mount] = []

    def make(*options: str, config: Path | None = None, env: dict[str, str] | None = None) -> Mount:
        index = len(mounts)
        mount = Mount(tmp_path / f"mnt{index}", config or lake.datalakefs_config,
                      f"cache_dir={tmp_path / f'cache{index}'}", f"state_dir={tmp_path / f'state{index}'}",
                      *options, env=env)
        mounts.append(mount)
        return mount

    yield make
    for mount in mounts:
        mount.stop()


@pytest.fixture
def proxied_rucio_config(lake: LakeStatus, tmp_path: Path) -> Iterator[tuple[Path, TcpProxy]]:
    """A copy of the lake's rucio.cfg whose server is reached through a proxy the test can cut."""
    text = lake.rucio_config.read_text()
    port = int(re.search(r"rucio_host\s*=\s*https?://[^:]+:(\d+)", text).group(1))  # type: ignore[union-attr]
    proxy = TcpProxy(("127.0.0.1", port))
    config = tmp_path / "rucio-proxied.cfg"
    config.write_text(text.replace(f":{port}", f":{proxy.port}"))
    yield config, proxy
    proxy.close()


@pytest.fixture
def hung_mount(tmp_path: Path) -> Iterator[Path]:
    """A FUSE mount whose daemon never answers statfs (tests/fuse/hung_fs.py)."""
    mountpoint = tmp_path / "hung"
    mountpoint.mkdir()
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hung_fs.py")), str(mountpoint)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield mountpoint
    finally:
        server.kill()
        server.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()
        if mounted_fstype(str(mountpoint)) is not None:
            unmount(str(mountpoint), lazy=True)


@pytest.fixture(scope="session")
def test_user() -> Iterator[TestUser]:
    """An unprivileged account (see tests/fuse/users.py); fails, never skips, where users cannot mount."""
    problem = fuse_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    user = unprivileged_user()
    yield user
    shutil.rmtree(user.home, ignore_errors=True)
