"""Mount lifecycle and failure behaviour through real mounts (issue 4)."""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from datalakefs.demo.status import LakeStatus
from datalakefs.fuse.session import wait_gone
from tests.fuse.mounting import Mount, fstab_mounted
from tests.fuse.tcpproxy import TcpProxy

pytestmark = [pytest.mark.lake, pytest.mark.fuse]


def test_umount_ends_the_daemon(lake: LakeStatus, new_mount: Callable[..., Mount]) -> None:
    mount = new_mount()
    mount.start()
    assert set(lake.seed.scopes) <= set(os.listdir(mount.mountpoint))
    pid = mount.pid
    done = mount.umount()
    assert done.returncode == 0, done.stderr
    assert not mount.is_mounted()
    with pytest.raises(ProcessLookupError):  # umount returns only once the daemon has finished
        os.kill(pid, 0)


def test_sigterm_unmounts_cleanly(new_mount: Callable[..., Mount]) -> None:
    mount = new_mount()
    mount.start()
    pid = mount.pid
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, timeout=10)
    assert not mount.is_mounted()


def test_stale_mount_after_sigkill_is_cleaned_by_the_next_mount(lake: LakeStatus,
                                                                 new_mount: Callable[..., Mount]) -> None:
    mount = new_mount()
    mount.start()
    os.kill(mount.pid, signal.SIGKILL)
    with pytest.raises(OSError) as dead:
        os.listdir(mount.mountpoint)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    mount.start()
    assert set(lake.seed.scopes) <= set(os.listdir(mount.mountpoint))


def test_mounting_twice_is_refused(new_mount: Callable[..., Mount]) -> None:
    mount = new_mount()
    mount.start()
    with pytest.raises(AssertionError, match="already a mount point"):
        mount.start()


def test_fstab_helper_mounts(lake: LakeStatus, tmp_path: Path) -> None:
    with fstab_mounted(lake.datalakefs_config, tmp_path, "rw,nodev") as mount:
        assert set(lake.seed.scopes) <= set(os.listdir(mount.mountpoint))


def test_catalogue_outage_gives_eio_and_recovers(lake: LakeStatus, new_mount: Callable[..., Mount],
                                                 proxied_rucio_config: tuple[Path, TcpProxy]) -> None:
    config, proxy = proxied_rucio_config
    mount = new_mount(f"rucio_config={config}", "negative_ttl=0", "catalogue_ttl=0.5")
    mount.start()
    scope = lake.seed.scopes[0]
    assert os.listdir(mount.mountpoint / scope)
    proxy.cut()
    with pytest.raises(OSError) as outage:
        os.stat(mount.mountpoint / scope / "a-name-never-looked-up")
    assert outage.value.errno == errno.EIO
    assert mount.is_mounted()
    proxy.restore()
    deadline = time.monotonic() + 30
    while True:
        try:
            os.listdir(mount.mountpoint / scope / ".")
            os.stat(mount.mountpoint / lake.seed.scopes[1])
            break
        except OSError:
            assert time.monotonic() < deadline, "the mount did not recover"
            time.sleep(0.5)


def test_refused_credentials_stop_the_mount_with_the_reason(lake: LakeStatus, new_mount: Callable[..., Mount],
                                                            tmp_path: Path) -> None:
    text = lake.rucio_config.read_text()
    config = tmp_path / "rucio-badpass.cfg"
    text = re.sub(r"(?m)^password\s*=.*$", "password = not-the-password", text)
    config.write_text(re.sub(r"(?m)^auth_token_file_path\s*=.*$", f"auth_token_file_path = {tmp_path / 'token'}",
                             text))
    mount = new_mount(f"rucio_config={config}")
    with pytest.raises(AssertionError, match="refused our credentials"):
        mount.start()
    assert not mount.is_mounted()
