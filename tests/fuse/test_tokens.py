"""Token-protected storage through a real mount (issue 8, SPEC §6).

The mounts read LAKE-ORIGIN's ``root://`` replicas only (``read_schemes=root``), through an endpoint
that requires a bearer token: the SciTokens origin itself or the nginx guard in front of the XCache
(``xcache=`` in swap mode), so no open door is left to fall back to.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from datalakefs.demo.seed import rse_file
from datalakefs.demo.status import LakeStatus
from datalakefs.model import DID
from tests.fuse.mounting import Mount
from tests.fuse.test_browse import path_of

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

ENDPOINTS = ("token_http", "guard_http")


def mint(lake: LakeStatus, *extra: str) -> str:
    return subprocess.run([*lake.token_command, *extra], capture_output=True, text=True, check=True).stdout.strip()


def write_token(path: Path, token: str) -> None:
    """As token refreshers do: a new file renamed over the old one, readable by its owner only."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(tmp, path)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return tmp_path / "bt"


@pytest.fixture
def protected_mount(
    lake: LakeStatus, new_mount: Callable[..., Mount], token_file: Path
) -> Callable[..., Mount]:
    """``protected_mount(endpoint, *options)``: a started mount reading through ``endpoint`` only."""
    env = {k: v for k, v in os.environ.items() if k != "BEARER_TOKEN"}
    env["BEARER_TOKEN_FILE"] = str(token_file)

    def make(endpoint: str, *options: str) -> Mount:
        mount = new_mount("read_schemes=root", f"xcache={lake.urls[endpoint]}", "xcache_mode=swap", *options,
                          env=env)
        mount.start()
        return mount

    return make


def origin_copy(lake: LakeStatus, did_text: str) -> Path:
    did = DID.parse(did_text)
    return rse_file(lake.paths["origin"], did.scope, did.name)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_no_token_is_eacces_and_a_valid_token_gives_the_data(
    lake: LakeStatus, protected_mount: Callable[..., Mount], token_file: Path, endpoint: str
) -> None:
    did = lake.seed.sized_files[1048577]
    mount = protected_mount(endpoint)
    path = path_of(mount, did)
    with pytest.raises(PermissionError) as caught:
        path.read_bytes()
    assert caught.value.errno == errno.EACCES
    write_token(token_file, mint(lake))
    assert path.read_bytes() == origin_copy(lake, did).read_bytes()


def test_expired_and_foreign_tokens_are_refused_and_a_new_file_is_picked_up(
    lake: LakeStatus, protected_mount: Callable[..., Mount], token_file: Path
) -> None:
    did = lake.seed.sized_files[1048576]
    write_token(token_file, mint(lake, "--expired"))
    mount = protected_mount("token_http")
    path = path_of(mount, did)
    with pytest.raises(PermissionError):
        path.read_bytes()
    write_token(token_file, mint(lake, "--wrong-key"))
    with pytest.raises(PermissionError):
        path.read_bytes()
    write_token(token_file, mint(lake))  # no remount: the daemon sees the file changed
    assert path.read_bytes() == origin_copy(lake, did).read_bytes()
    assert mount.status()["storage_auth"]["bearer_token"] == str(token_file)


def test_a_token_file_readable_by_others_is_refused_at_mount_time(
    lake: LakeStatus, new_mount: Callable[..., Mount], token_file: Path
) -> None:
    write_token(token_file, mint(lake))
    os.chmod(token_file, 0o644)
    env = {k: v for k, v in os.environ.items() if k != "BEARER_TOKEN"}
    env["BEARER_TOKEN_FILE"] = str(token_file)
    mount = new_mount("read_schemes=root", f"xcache={lake.urls['token_http']}", env=env)
    with pytest.raises(AssertionError) as caught:
        mount.start()
    assert f"bearer token file {token_file} is readable or writable by its group or others" in str(caught.value)
    assert f"chmod 600 {token_file}" in str(caught.value)
    assert not mount.is_mounted()


ROTATE_EVERY = 16 << 20


def test_a_token_rotated_during_a_long_read_causes_no_error(
    lake: LakeStatus, protected_mount: Callable[..., Mount], token_file: Path
) -> None:
    """The token file is replaced by a new token after every 16 MiB the reader got: paced by the
    read, not by the clock, so every run rotates the same number of times whatever the speed."""
    did = lake.seed.big_file
    write_token(token_file, mint(lake, "--lifetime", "60"))
    mount = protected_mount("token_http")
    h = hashlib.sha256()
    rotations = done = 0
    with open(path_of(mount, did), "rb") as fh:  # any error raises here: none is allowed
        while chunk := fh.read(4 << 20):
            h.update(chunk)
            done += len(chunk)
            if done % ROTATE_EVERY == 0:
                write_token(token_file, mint(lake, "--lifetime", "60"))
                rotations += 1
    assert h.hexdigest() == digest(origin_copy(lake, did))
    assert rotations >= 2, "the file is too short for two rotations: use a bigger one"
    status = mount.status()
    assert status["content"]["failed_requests"] == 0
    assert status["storage_auth"]["token_reads"] >= 2  # the first token and at least one rotated in


def test_a_canary_token_never_appears_in_logs_status_or_xattrs(
    lake: LakeStatus, protected_mount: Callable[..., Mount], token_file: Path
) -> None:
    canary = mint(lake)
    expired = mint(lake, "--expired")
    write_token(token_file, expired)
    mount = protected_mount("token_http", "log_level=DEBUG")
    path = path_of(mount, lake.seed.sized_files[1])
    with pytest.raises(PermissionError):
        path.read_bytes()  # a refusal: error texts and warnings are written
    write_token(token_file, canary)
    assert len(path.read_bytes()) == 1
    texts = {"status.json": (mount.mountpoint / ".datalakefs" / "status.json").read_text()}
    for name in os.listxattr(path):
        texts[f"xattr {name}"] = os.getxattr(path, name).decode(errors="replace")
    mount.stop()
    logs = list((Path(mount.options[1].partition("=")[2]) / "logs").glob("*.log"))
    assert logs
    for log in logs:
        texts[str(log)] = log.read_text()
    daemon_log = "".join(texts[str(log)] for log in logs)
    assert "level=DEBUG" in daemon_log and str(token_file) in daemon_log  # the log did talk about tokens
    # and about the refusal, in one warning
    assert re.search(r"level=WARNING .*read failed: .*HTTP 403 Forbidden \(EACCES\)", daemon_log)
    for name, text in texts.items():
        for secret in (canary, expired):
            assert secret not in text, f"a token leaked into {name}"
            assert secret.split(".")[2] not in text, f"a token signature leaked into {name}"
