"""Token-protected storage through a real mount (issues 8 and 14, SPEC §6).

The reading mounts read LAKE-ORIGIN's ``root://`` replicas only (``read_schemes=root``), through an
endpoint that requires a bearer token: the SciTokens origin itself or the nginx guard in front of the
XCache (``xcache=`` in swap mode), so no open door is left to fall back to. The uploading mounts write
to SCRATCH, whose WebDAV doors refuse every change without a token or the demo X.509 proxy; the
lake's authoriser logs which credential let each change in.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import stat
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo.seed import rse_file
from datalakefs.demo.status import LakeStatus
from datalakefs.model import DID
from tests.faults.origin import FaultyOrigin
from tests.fuse.mounting import Mount, datalakefs
from tests.fuse.test_browse import path_of
from tests.fuse.test_outbox import STATE, unique, wait_until
from tests.fuse.test_rucio_auth import rucio_cfg

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

ENDPOINTS = ("token_http", "guard_http")
WRITE_SCOPE = "storage.create:/SCRATCH storage.modify:/SCRATCH"


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


def test_a_canary_token_never_appears_in_logs_status_xattrs_or_metrics(
    lake: LakeStatus, protected_mount: Callable[..., Mount], token_file: Path
) -> None:
    canary = mint(lake, "--scope", f"storage.read:/ {WRITE_SCOPE}")
    expired = mint(lake, "--expired")
    write_token(token_file, expired)
    mount = protected_mount("token_http", "log_level=DEBUG", "metrics_port=0")
    path = path_of(mount, lake.seed.sized_files[1])
    with pytest.raises(PermissionError):
        path.read_bytes()  # a refusal: error texts and warnings are written
    uploading = write_outbox_file(lake, mount, b"canary upload")
    wait_until(lambda: "refused our credentials" in os.getxattr(uploading, STATE).decode(), what="a refused upload")
    texts = {f"xattr {name} (refused upload)": os.getxattr(uploading, name).decode(errors="replace")
             for name in os.listxattr(uploading)}
    write_token(token_file, canary)
    assert len(path.read_bytes()) == 1
    datalakefs("outbox", "retry", str(uploading))
    wait_until(lambda: not uploading.exists(), what="the upload with the canary token")
    control = mount.mountpoint / ".datalakefs"
    texts["status.json"] = (control / "status.json").read_text()
    texts["outbox.json"] = (control / "outbox.json").read_text()
    with urllib.request.urlopen(mount.status()["metrics"]["url"], timeout=30) as metrics:
        texts["metrics"] = metrics.read().decode()
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
    assert "event=upload-retry" in daemon_log  # and about the refused upload
    for name, text in texts.items():
        for secret in (canary, expired):
            assert secret not in text, f"a token leaked into {name}"
            assert secret.split(".")[2] not in text, f"a token signature leaked into {name}"


# -- uploads through the strict doors ------------------------------------------------------------------


@pytest.fixture
def upload_mount(lake: LakeStatus, new_mount: Callable[..., Mount], token_file: Path, tmp_path: Path
                 ) -> Callable[..., Mount]:
    """``upload_mount(proxy, *options)``: a started mount whose only storage credentials are the token
    file (when it exists) and, when ``proxy``, the demo X.509 proxy."""

    def make(proxy: bool, *options: str) -> Mount:
        env = {k: v for k, v in os.environ.items() if k not in ("BEARER_TOKEN", "X509_USER_PROXY")}
        env["BEARER_TOKEN_FILE"] = str(token_file)
        env["X509_USER_PROXY"] = str(lake.x509_user_proxy if proxy else tmp_path / "no-proxy")
        mount = new_mount(*options, env=env)
        mount.start()
        return mount

    return make


def write_outbox_file(lake: LakeStatus, mount: Mount, data: bytes) -> Path:
    assert lake.seed is not None
    dataset = mount.mountpoint / ".outbox" / lake.seed.upload_scope / unique("ds")
    dataset.mkdir()
    target = dataset / unique("f")
    target.write_bytes(data)
    return target


def authoriser_says(lake: LakeStatus, name: str) -> list[str]:
    """The lake's authoriser's decisions about paths that end in ``name``."""
    log = Path(lake.paths["log"]) / "dav-auth.log"
    return [line.split(" ", 2)[2] for line in log.read_text().splitlines() if name in line]


@pytest.mark.parametrize("credential", ["token", "x509 proxy"])
def test_an_upload_presents_the_mounts_credential_to_the_strict_lake(
    lake: LakeStatus, upload_mount: Callable[..., Mount], token_file: Path, rucio_client: Any, credential: str
) -> None:
    if credential == "token":
        write_token(token_file, mint(lake, "--scope", WRITE_SCOPE))
    mount = upload_mount(credential == "x509 proxy")
    data = os.urandom(100_000)
    target = write_outbox_file(lake, mount, data)
    wait_until(lambda: not target.exists(), what="the upload")
    assert lake.seed is not None
    meta = rucio_client.get_metadata(lake.seed.upload_scope, target.name)
    assert meta["bytes"] == len(data)
    decisions = authoriser_says(lake, target.name)
    expected = "token of" if credential == "token" else "certificate /organizationName=datalakefs demo lake"
    assert any(line.startswith("204 PUT") and expected in line for line in decisions), decisions


def test_an_expired_token_fails_the_upload_with_its_reason_and_a_renewed_file_succeeds_without_remount(
    lake: LakeStatus, upload_mount: Callable[..., Mount], token_file: Path
) -> None:
    expired = mint(lake, "--scope", WRITE_SCOPE, "--expired")
    write_token(token_file, expired)
    mount = upload_mount(False)
    target = write_outbox_file(lake, mount, b"waits for a good token")
    state = wait_until(lambda: "refused our credentials" in (text := os.getxattr(target, STATE).decode()) and text,
                       what="the refusal in the file's state")
    assert "HTTP 403" in state and expired.split(".")[2] not in state
    assert any("token refused: expired" in line for line in authoriser_says(lake, target.name))
    write_token(token_file, mint(lake, "--scope", WRITE_SCOPE))
    datalakefs("outbox", "retry", str(target))  # skip the backoff (a busy attempt retries by itself)
    wait_until(lambda: not target.exists(), what="the upload with the renewed token")
    assert mount.is_mounted()


def test_a_token_is_not_sent_over_plain_http_to_a_host_name_unless_allowed(
    lake: LakeStatus, protected_mount: Callable[..., Mount], token_file: Path, new_mount: Callable[..., Mount]
) -> None:
    """The host's own name maps to 127.0.0.1 here, but the URL says a name: the token stays home."""
    name = socket.gethostname()
    if name == "localhost" or not socket.gethostbyname(name).startswith("127."):
        pytest.skip(f"the host name {name!r} does not map to a loopback address here")
    write_token(token_file, mint(lake))
    port = lake.urls["token_http"].rsplit(":", 1)[1]
    did = lake.seed.sized_files[1]
    env = {k: v for k, v in os.environ.items() if k != "BEARER_TOKEN"}
    env["BEARER_TOKEN_FILE"] = str(token_file)
    refused = new_mount("read_schemes=root", f"xcache=http://{name}:{port}", "xcache_mode=swap", env=env)
    refused.start()
    with pytest.raises(OSError) as error:
        path_of(refused, did).read_bytes()
    assert error.value.errno in (errno.EACCES, errno.EIO)
    refused.stop()
    logs = "".join(log.read_text() for log in (Path(refused.options[1].partition("=")[2]) / "logs").glob("*.log"))
    assert "allow_token_over_http" in logs
    allowed = new_mount("read_schemes=root", f"xcache=http://{name}:{port}", "xcache_mode=swap",
                        "allow_token_over_http=true", env=env)
    allowed.start()
    assert len(path_of(allowed, did).read_bytes()) == 1


def test_a_trickling_server_times_out_clearly_and_the_next_transfer_proceeds(
    lake: LakeStatus, new_mount: Callable[..., Mount]
) -> None:
    """The XCache answers a byte a second (never a stall): the deadline of a 1 MiB block at 1 MiB/s
    plus 2 s abandons it, and the read goes on from the catalogue's replica."""
    assert lake.seed is not None
    did = lake.seed.sized_files[1 << 20]
    relative = origin_copy(lake, did).relative_to(Path(lake.paths["rse"]))
    with FaultyOrigin({str(relative): origin_copy(lake, did).read_bytes()}, fault_rate=1.0, faults=["trickle"]) as slow:
        mount = new_mount(f"xcache={slow.base}", "http_retries=0", "http_timeout=2", "transfer_min_rate=1M",
                          "piece_reads=false")
        mount.start()
        path = path_of(mount, did)
        assert digest(path) == digest(origin_copy(lake, did))
        stats = mount.status()["content"]
        assert slow.requests, "the trickling server was never asked"
    assert stats["failed_requests"] >= 1
    mount.stop()
    logs = "".join(log.read_text() for log in (Path(mount.options[1].partition("=")[2]) / "logs").glob("*.log"))
    assert "minimum rate" in logs


def test_what_a_mount_writes_is_its_users_alone(
    lake: LakeStatus, new_mount: Callable[..., Mount], tmp_path: Path
) -> None:
    """Journal, logs, rucio's token cache and the mount records are 0600 in 0700 directories, also
    when an earlier version left them open."""
    state = tmp_path / "state-private"
    (state / "logs").mkdir(parents=True, mode=0o755)
    (state / "logs").chmod(0o755)
    old_log = state / "logs" / "old.log"
    old_log.write_text("from before\n")
    old_log.chmod(0o644)
    elsewhere = tmp_path / "not-ours"
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    (state / "logs" / "link").symlink_to(elsewhere)
    config = rucio_cfg(lake, tmp_path / "rucio.cfg", auth_token_file_path=None)  # the token cached per mount
    mount = new_mount(f"state_dir={state}", f"rucio_config={config}")
    mount.start()
    target = write_outbox_file(lake, mount, b"journaled")
    wait_until(lambda: not target.exists(), what="the upload")
    assert path_of(mount, lake.seed.sized_files[1]).read_bytes()  # rucio's token cache is written
    modes = {}
    for directory, _dirs, files in os.walk(state):
        if directory == str(state):
            continue  # the test made it; the mount's own subdirectories are what it keeps private
        modes[directory] = os.lstat(directory).st_mode
        for name in files:
            modes[os.path.join(directory, name)] = os.lstat(os.path.join(directory, name)).st_mode
    names = " ".join(modes)
    for written in ("journal.sqlite", ".log", "/rucio/auth_token", "/mounts/"):
        assert written in names
    loose = {path: oct(mode) for path, mode in modes.items() if not stat.S_ISLNK(mode) and mode & 0o077}
    assert loose == {}
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755  # a link is never followed
