"""Real mounts of the test lake: one shared read-only mount per session, and fresh ones on demand."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from datalakefs.demo.status import LakeStatus
from tests.fuse.mounting import Mount
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


@pytest.fixture(scope="session")
def test_user() -> Iterator[TestUser]:
    """An unprivileged account (see tests/fuse/users.py); fails, never skips, where users cannot mount."""
    problem = fuse_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    user = unprivileged_user()
    yield user
    shutil.rmtree(user.home, ignore_errors=True)
