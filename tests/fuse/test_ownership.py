"""Ownership and read-only mounts through real mounts (issue 15): a root daemon serving another user
(the notebook pod's sidecar serving uid 1000), and ``ro`` from ``-o`` and from an fstab line."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo.status import LakeStatus
from tests.fuse.mounting import Mount, fstab_mounted
from tests.fuse.test_nonroot import uploaded, wait_for
from tests.fuse.users import TestUser

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

ROOT = Path(__file__).resolve().parents[2]
POD = ROOT / "docker" / "pod.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_a_root_daemon_serves_another_user_with_a_writable_outbox(
    lake: LakeStatus, test_user: TestUser, rucio_client: Any
) -> None:
    """The pod: the sidecar runs as root, the notebook as another uid that must read and write back."""
    assert lake.seed is not None
    # the pod's own options, with the test user in place of the notebook's uid 1000 and gid 100
    options = sidecar_options().replace("uid=1000", f"uid={test_user.uid}").replace("gid=100", f"gid={test_user.gid}")
    assert f"uid={test_user.uid}" in options and f"gid={test_user.gid}" in options and "allow_other" in options
    base = test_user.home / f"pod-{uuid.uuid4().hex[:6]}"  # where the user can reach (tmp_path is root's 0700)
    with Mount(base / "lake", lake.datalakefs_config, f"cache_dir={base / 'cache'}", f"state_dir={base / 'state'}",
               options) as mount:
        check_pod_user(lake, test_user, rucio_client, mount.mountpoint)


def sidecar_options() -> str:
    """The ``-o`` options of the sidecar in docker/pod.yaml."""
    args = json.loads(re.search(r"(?m)^\s+args: (\[.*\])$", POD.read_text()).group(1))  # type: ignore[union-attr]
    assert args[0] == "-o"
    return str(args[1])


def test_the_pod_keeps_spool_and_journal_on_a_volume() -> None:
    """The outbox lives in the state directory: the image puts it at /var/lib/datalakefs, the pod
    mounts a volume there."""
    assert "XDG_STATE_HOME=/var/lib" in DOCKERFILE.read_text()
    volume_mounts = re.findall(r"(?m)^\s+- name: (\S+)\n\s+mountPath: (\S+)", POD.read_text())
    assert ("lake-state", "/var/lib/datalakefs") in volume_mounts
    assert "spool_dir" not in sidecar_options()


def check_pod_user(lake: LakeStatus, test_user: TestUser, rucio_client: Any, root: Path) -> None:
    assert lake.seed is not None
    for path in (root, root / ".outbox", root / lake.seed.scopes[0]):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (test_user.uid, test_user.gid, 0o775)

    # the notebook user reads and lists
    assert set(lake.seed.scopes) <= set(test_user.output("ls", str(root)).split())
    did = lake.seed.sized_files[1]
    scope, name = did.split(":")
    path = root / scope / lake.seed.sized_dataset.split(":")[1] / name
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert test_user.output("wc", "-c", str(path)).split()[0] == "1"

    # ... and writes results back through the outbox
    unique = uuid.uuid4().hex[:8]  # file names are unique per scope in Rucio
    dataset, result = f"pod_{unique}", f"result_{unique}.csv"
    target = root / ".outbox" / lake.seed.upload_scope / dataset
    test_user.output("mkdir", str(target))
    test_user.output("sh", "-c", f"echo 'x,y' > {target / result}")
    written = target / result
    assert (written.stat().st_uid, stat.S_IMODE(written.stat().st_mode)) == (test_user.uid, 0o664)
    meta = wait_for(lambda: uploaded(rucio_client, lake.seed.upload_scope, result, dataset), "the upload")
    assert meta["bytes"] == 4

    # a third user, not the owner, may look but not write (default_permissions checks the modes)
    nobody = subprocess.run(["mkdir", str(root / ".outbox" / lake.seed.upload_scope / "not-mine")],
                            capture_output=True, text=True, user="nobody", group="nogroup", extra_groups=[],
                            check=False)
    assert nobody.returncode != 0 and "Permission denied" in nobody.stderr


def assert_read_only(root: Path, lake: LakeStatus) -> None:
    assert lake.seed is not None
    assert ".outbox" not in os.listdir(root)
    assert set(lake.seed.scopes) <= set(os.listdir(root))
    directory = root / lake.seed.scopes[0]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o555
    assert stat.S_IMODE(os.statvfs(root).f_flag) & os.ST_RDONLY
    with pytest.raises(OSError) as refused:
        os.setxattr(directory, "user.datalakefs.stage", b"1")
    assert refused.value.errno == errno.EROFS
    with pytest.raises(OSError) as no_outbox:
        os.mkdir(root / ".outbox")
    assert no_outbox.value.errno == errno.EROFS


def test_ro_mount_has_no_outbox_and_no_write_bit(lake: LakeStatus, new_mount: Callable[..., Mount]) -> None:
    mount = new_mount("ro")
    mount.start()
    assert_read_only(mount.mountpoint, lake)
    assert re.search(r"\bro\b", _mount_options(mount.mountpoint))


def test_fstab_ro_is_kept(lake: LakeStatus, tmp_path: Path) -> None:
    with fstab_mounted(lake.datalakefs_config, tmp_path, "ro,nodev") as mount:
        assert_read_only(mount.mountpoint, lake)


def _mount_options(mountpoint: Path) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            return fields[5]
    raise AssertionError(f"{mountpoint} is not mounted")
