"""Mount lifecycle promises of docs/SEMANTICS.md through real mounts: the ways to unmount, a dead and
a wedged mount, who may use a mount, statfs, and a re-read the daemon never sees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo.status import LakeStatus
from datalakefs.fuse.session import mounted_fstype, wait_gone
from tests.fuse.mounting import Mount, datalakefs, kill_and_unmount
from tests.fuse.test_browse import path_of
from tests.fuse.test_outbox import check_in_lake
from tests.fuse.test_promises_outbox import resume_with_a_working_rse, waiting_file
from tests.fuse.waiting import wait_until

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

NOBODY = 65534
ENTRYPOINT = Path(__file__).parents[2] / "docker" / "entrypoint.sh"


@pytest.mark.parametrize("stop", ["SIGINT", "fusermount3 -u"])
def test_sigint_and_fusermount_unmount_cleanly(
    lake: LakeStatus, new_mount: Callable[..., Mount], stop: str
) -> None:
    mount = new_mount()
    mount.start()
    pid = mount.pid
    if stop == "SIGINT":
        os.kill(pid, signal.SIGINT)
    else:
        done = subprocess.run(["fusermount3", "-u", str(mount.mountpoint)], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, done.stderr
    assert wait_gone(pid, timeout=60), "the daemon did not exit"
    assert not mount.is_mounted()
    log = mount.daemon_log()
    assert "event=unmounted" in log and "Traceback" not in log


def test_uploads_stay_resumable_after_sigterm(
    lake: LakeStatus, new_mount: Callable[..., Mount], rucio_client: Any
) -> None:
    broken, target = waiting_file(lake, new_mount, b"survives SIGTERM")
    wait_until(lambda: "attempt" in os.getxattr(target, "user.datalakefs.state").decode(), what="a failed attempt")
    pid = broken.pid
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, timeout=60)
    assert not broken.is_mounted()
    resume_with_a_working_rse(broken, target)
    check_in_lake(rucio_client, lake, target.parent.parent.name, target.parent.name, target.name, b"survives SIGTERM")


def test_status_exits_1_for_a_dead_mount(new_mount: Callable[..., Mount]) -> None:
    mount = new_mount()
    mount.start()
    cli = ["--config", str(mount.config), *(arg for option in mount.options for arg in ("-o", option))]
    alive = datalakefs("status", str(mount.mountpoint), *cli)
    assert alive.returncode == 0, alive.stderr
    pid = mount.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid, timeout=30)
    dead = datalakefs("status", str(mount.mountpoint), *cli)
    assert dead.returncode == 1, dead.stdout + dead.stderr


def test_umount_aborts_a_wedged_mount(lake: LakeStatus, hung_mount: Path) -> None:
    done = datalakefs("umount", str(hung_mount), "--config", str(lake.datalakefs_config), timeout=120)
    assert done.returncode == 0, done.stderr
    assert mounted_fstype(str(hung_mount)) is None


def test_mount_replaces_a_wedged_mount(lake: LakeStatus, hung_mount: Path, tmp_path: Path) -> None:
    options = [f"cache_dir={tmp_path / 'cache'}", f"state_dir={tmp_path / 'state'}"]
    started = datalakefs("mount", str(hung_mount), "--config", str(lake.datalakefs_config),
                         *(arg for option in options for arg in ("-o", option)), timeout=120)
    mount = Mount(hung_mount, lake.datalakefs_config, *options)  # made after: the wedged mount answers no stat
    try:
        assert started.returncode == 0, started.stderr
        assert mounted_fstype(str(hung_mount)) == "fuse.datalakefs"
        assert set(lake.seed.scopes) <= set(os.listdir(hung_mount))
        assert "event=hung-mount" in started.stderr + mount.daemon_log()
    finally:
        mount.stop()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is private to root), for mount points."""
    path = Path(tempfile.mkdtemp(prefix="datalakefs-users-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.rmdir()
    path.rmdir()


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60,
                          user=NOBODY, group=NOBODY, extra_groups=[])


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user needs root")
def test_other_users_are_refused_without_allow_other(
    lake: LakeStatus, shared_dir: Path, tmp_path: Path
) -> None:
    private = Mount(shared_dir / "private", lake.datalakefs_config, f"cache_dir={tmp_path / 'c1'}",
                    f"state_dir={tmp_path / 's1'}")
    shared = Mount(shared_dir / "shared", lake.datalakefs_config, f"cache_dir={tmp_path / 'c2'}",
                   f"state_dir={tmp_path / 's2'}", "allow_other=true")
    try:
        private.start()
        shared.start()
        assert set(lake.seed.scopes) <= set(os.listdir(private.mountpoint))  # its owner gets in
        refused = as_nobody("ls", str(private.mountpoint))
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
        allowed = as_nobody("ls", str(shared.mountpoint))
        assert allowed.returncode == 0, allowed.stderr
        assert set(lake.seed.scopes) <= set(allowed.stdout.split())
    finally:
        private.stop()
        shared.stop()


def test_statfs(lake_mount: Mount) -> None:
    stats = os.statvfs(lake_mount.mountpoint)
    assert stats.f_bsize == 1 << 20
    assert stats.f_namemax == 255


def test_a_re_read_does_not_reach_the_daemon(lake: LakeStatus, new_mount: Callable[..., Mount]) -> None:
    mount = new_mount("xcache=none")
    mount.start()
    path = path_of(mount, lake.seed.sized_files[(1 << 20) + 1], lake.seed.sized_dataset)

    def blocks_read() -> int:
        content = mount.status()["content"]
        return int(content["hits"]) + int(content["misses"])

    first = path.read_bytes()
    after_first = blocks_read()
    assert after_first > 0
    assert path.read_bytes() == first
    assert blocks_read() == after_first  # served by the kernel's page cache


def test_a_live_mount_is_not_stale(lake_mount: Mount) -> None:
    from datalakefs.fuse.session import is_stale

    assert lake_mount.is_mounted()
    assert not is_stale(str(lake_mount.mountpoint), hung_after=5.0)



def test_the_sidecar_detaches_lazily_when_the_daemon_does_not_stop(tmp_path: Path) -> None:
    """The sidecar entrypoint passes SIGTERM on; a daemon still running after DATALAKEFS_STOP_TIMEOUT
    gets its mount detached lazily and is killed, so the notebook container never keeps a dead mount."""
    mountpoint = tmp_path / "lake"
    stubborn = f"{sys.executable} {Path(__file__).with_name('hung_fs.py')} --ignore-sigterm"
    env = {**os.environ, "DATALAKEFS_MOUNTPOINT": str(mountpoint), "DATALAKEFS": stubborn,
           "DATALAKEFS_STOP_TIMEOUT": "2"}
    log_path = tmp_path / "sidecar.log"
    with open(log_path, "wb") as stderr:
        process = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: mounted_fstype(str(mountpoint)) is not None, timeout=60, what="the sidecar's mount")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGKILL, log_path.read_text()
        log = log_path.read_text()
        assert "event=stop " in log and "event=stop-timeout" in log and "action=lazy-unmount" in log
        assert mounted_fstype(str(mountpoint)) is None
    finally:
        kill_and_unmount(process, mountpoint)
