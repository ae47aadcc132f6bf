"""datalakefs from a scientist's own account (issue 15): an unprivileged user mounts the real lake,
browses, reads, writes into the outbox, stages with the xattr, clears the cache, asks for the status
and unmounts, every step as that user through the real command line; and a mount that cannot
authenticate stops at mount time with the reason.

The user has its own copies of the lake's rucio.cfg and X509 proxy (root's are 0600), as a real user
has their own; the user's rucio.cfg leaves out the lake's ``auth_token_file_path`` (root's token file).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo import seed
from datalakefs.demo.status import LakeStatus
from datalakefs.fuse.session import mounted_fstype
from tests.fuse.mounting import Mount, datalakefs
from tests.fuse.users import TestUser

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

TOKEN_FILE_LINE = re.compile(r"(?m)^auth_token_file_path\s*=.*$")


def user_config(lake: LakeStatus, user: TestUser, token_file_line: str = "") -> tuple[Path, dict[str, str]]:
    """The user's datalakefs.toml (pointing at the user's rucio.cfg) and environment."""
    rucio_cfg = user.home / f"rucio-{uuid.uuid4().hex[:6]}.cfg"
    rucio_cfg.write_text(TOKEN_FILE_LINE.sub(token_file_line, lake.rucio_config.read_text()))
    user.give(rucio_cfg)
    proxy = user.home / "x509up"
    proxy.write_bytes(Path(lake.env["X509_USER_PROXY"]).read_bytes())
    user.give(proxy)
    toml = re.sub(r'(?m)^rucio_config\s*=.*$', f'rucio_config = "{rucio_cfg}"', lake.datalakefs_config.read_text())
    toml = re.sub(r"(?m)^(cache_dir|state_dir)\s*=.*$", "", toml)
    config = user.home / f"datalakefs-{rucio_cfg.stem}.toml"
    config.write_text(toml)
    user.give(config, 0o644)
    return config, {"X509_USER_PROXY": str(proxy)}


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def daemon_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"(?m)^Uid:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def test_an_unprivileged_user_mounts_reads_writes_stages_and_unmounts(
    lake: LakeStatus, test_user: TestUser, rucio_client: Any
) -> None:
    assert lake.seed is not None
    config, env = user_config(lake, test_user)
    state_dir = test_user.home / "state"
    mount = Mount(test_user.home / "lake", config, f"cache_dir={test_user.home / 'cache'}",
                  f"state_dir={state_dir}", env=env, user=test_user)
    options = ["--config", str(config), "-o", f"state_dir={state_dir}"]
    with mount:
        root = mount.mountpoint
        assert daemon_uid(mount.pid) == test_user.uid

        # browse
        assert set(lake.seed.scopes) <= set(test_user.output("ls", str(root)).split())
        listing = test_user.output("ls", "-ln", str(root / lake.seed.scopes[0]))
        assert f" {test_user.uid} {test_user.gid} " in listing  # the user's own files

        # read, checked against the seeded bytes
        did = lake.seed.sized_files[1 << 20]
        scope, name = did.split(":")
        path = root / scope / lake.seed.sized_dataset.split(":")[1] / name
        expected = seed.content(lake.seed.content_key, did, 1 << 20)
        assert test_user.output("sha256sum", str(path)).split()[0] == hashlib.sha256(expected).hexdigest()
        assert mount.status()["content"]["cache"]["used_bytes"] >= len(expected)

        # the cache, cleared through the running mount
        test_user.output(sys.executable, "-m", "datalakefs", "cache", "clear", str(root), *options)
        assert mount.status()["content"]["cache"]["used_bytes"] == 0

        # the outbox: a file the user writes ends up in the lake
        unique = uuid.uuid4().hex[:8]  # file names are unique per scope in Rucio
        dataset, name = f"nonroot_{unique}", f"result_{unique}.txt"
        target = root / ".outbox" / lake.seed.upload_scope / dataset
        test_user.output("mkdir", str(target))
        source = test_user.home / name
        data = f"written by {test_user.name}\n".encode() * 1000
        source.write_bytes(data)
        test_user.give(source)
        test_user.output("cp", str(source), str(target / name))
        meta = wait_for(lambda: uploaded(rucio_client, lake.seed.upload_scope, name, dataset), "the upload")
        assert meta["bytes"] == len(data) and meta["adler32"] == f"{zlib.adler32(data):08x}"

        # staging by the xattr
        stage_path = root / "lake" / "stage_me"
        test_user.output("setfattr", "-n", "user.datalakefs.stage", "-v", "1", str(stage_path))
        wait_for(lambda: re.match(r"rule \w+ OK", _state(test_user, stage_path)), "the rule to be OK")

        # status, as the user, finds the mount through the user's state dir
        status = test_user.output(sys.executable, "-m", "datalakefs", "status", *options, str(root))
        assert str(root) in status and "NOT ANSWERING" not in status

        # umount as the user: the mount and its daemon are gone
        pid = mount.pid
        test_user.output(sys.executable, "-m", "datalakefs", "umount", str(root), *options)
        assert not mount.is_mounted()
        assert not Path(f"/proc/{pid}").exists()


def uploaded(rucio_client: Any, scope: str, name: str, dataset: str) -> dict[str, Any] | None:
    """The file's metadata once it is in ``dataset``; None before."""
    from rucio.common.exception import DataIdentifierNotFound

    try:
        if name not in {row["name"] for row in rucio_client.list_content(scope, dataset)}:
            return None
        return dict(rucio_client.get_metadata(scope, name))
    except DataIdentifierNotFound:
        return None


def _state(user: TestUser, path: Path) -> str:
    return user.output("getfattr", "--only-values", "-n", "user.datalakefs.state", str(path))


def test_a_mount_that_cannot_authenticate_fails_at_mount_time(lake: LakeStatus, test_user: TestUser) -> None:
    """The user's rucio.cfg names root's token file (as the lake's own rucio.cfg does): rucio can
    neither read nor replace it, so it would send every request without a token."""
    token_file = TOKEN_FILE_LINE.search(lake.rucio_config.read_text())
    assert token_file is not None
    config, env = user_config(lake, test_user, token_file.group(0))
    mountpoint = test_user.home / "refused"
    mountpoint.mkdir()
    test_user.give(mountpoint, 0o755)
    done = datalakefs("mount", str(mountpoint), "--config", str(config), "-o",
                      f"state_dir={test_user.home / 'refused-state'},cache_dir={test_user.home / 'refused-cache'}",
                      env=env, user=test_user)
    try:
        assert done.returncode == 1
        assert "cannot authenticate" in done.stderr and "auth_token_file_path" in done.stderr, done.stderr
        assert mounted_fstype(str(mountpoint)) is None
    finally:
        if mounted_fstype(str(mountpoint)) is not None:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
