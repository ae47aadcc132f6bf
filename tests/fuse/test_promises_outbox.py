"""Outbox promises of docs/SEMANTICS.md through a real mount: a failed upload retried by the CLI, the
backoff between attempts, and the calls that change nothing or commit at once."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo import seed
from datalakefs.demo.status import LakeStatus
from datalakefs.fuse.session import wait_gone
from tests.fuse.mounting import Mount, datalakefs
from tests.fuse.tcpproxy import TcpProxy
from tests.fuse.test_outbox import STATE, ca_option, check_in_lake, unique, uploaded
from tests.fuse.waiting import wait_until

pytestmark = [pytest.mark.lake, pytest.mark.fuse]


def state(path: Path) -> str:
    return os.getxattr(path, STATE).decode()


def test_a_failed_upload_waits_for_outbox_retry_and_then_uploads(
    lake: LakeStatus, new_mount: Callable[..., Mount], proxied_rucio_config: tuple[Path, TcpProxy],
    rucio_client: Any, tmp_path: Path,
) -> None:
    """The catalogue goes away (the uploads back off 1 s, then 2 s), then the spool files do (the
    next attempts fail for good: `failed`, never tried again by themselves). With the bytes back,
    `outbox retry FILE` uploads that file alone, and `outbox retry --all-failed` the other."""
    assert lake.seed is not None
    config, proxy = proxied_rucio_config
    spool = tmp_path / "spool"
    mount = new_mount(ca_option(lake), f"rucio_config={config}", f"spool_dir={spool}")
    mount.start()
    scope, ds = lake.seed.upload_scope, unique("ds")
    path = mount.mountpoint / ".outbox" / scope / ds
    path.mkdir()
    proxy.cut()
    files = {unique("one"): b"first file", unique("two"): b"second file"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    first, second = files
    did = f"{scope}:{first}"
    retries = re.compile(rf"event=upload-retry did={re.escape(did)} attempt=(\d+) in_s=(\d+)")
    backoff = wait_until(lambda: len(found := retries.findall(mount.daemon_log())) >= 2 and found,
                         what="two failed attempts")
    assert [(int(a), int(s)) for a, s in backoff[:2]] == [(1, 1), (2, 2)]  # 1 s, doubling
    assert state(path / first).startswith("queued (attempt ")

    hidden = tmp_path / "hidden"
    hidden.mkdir()
    spool_files = sorted(spool.rglob("*.spool"))
    assert len(spool_files) == 2
    for spool_file in spool_files:
        spool_file.rename(hidden / spool_file.name)
    proxy.restore()
    for name in files:
        wait_until(lambda name=name: state(path / name).startswith("failed: spool file"), what=f"{name} failed")
    for spool_file in spool_files:
        (hidden / spool_file.name).rename(spool_file)

    retried = datalakefs("outbox", "retry", str(path / first))
    assert retried.returncode == 0, retried.stderr
    wait_until(lambda: not (path / first).exists(), what="the retried upload")
    check_in_lake(rucio_client, lake, scope, ds, first, files[first])
    assert state(path / second).startswith("failed: ")  # a failed upload is not retried by itself

    every = datalakefs("outbox", "retry", "--all-failed", "--mountpoint", str(mount.mountpoint))
    assert every.returncode == 0, every.stderr
    assert str(path / second) in every.stdout
    wait_until(lambda: not (path / second).exists(), what="the upload retried by --all-failed")
    check_in_lake(rucio_client, lake, scope, ds, second, files[second])


def waiting_file(lake: LakeStatus, new_mount: Callable[..., Mount], data: bytes) -> tuple[Mount, Path]:
    """A mount whose uploads wait (its upload RSE does not exist), and a file of ``data`` in a new
    dataset of its outbox."""
    assert lake.seed is not None
    mount = new_mount(ca_option(lake), "upload_rse=NO_SUCH_RSE")
    mount.start()
    target = mount.mountpoint / ".outbox" / lake.seed.upload_scope / unique("ds") / unique("f")
    target.parent.mkdir()
    target.write_bytes(data)
    return mount, target


def resume_with_a_working_rse(broken: Mount, target: Path) -> None:
    """Mount ``broken``'s mount point again with the lake's upload RSE; wait until ``target`` left."""
    fixed = Mount(broken.mountpoint, broken.config, *[o for o in broken.options if not o.startswith("upload_rse")])
    with fixed:
        wait_until(lambda: not target.exists(), what="the resumed upload")


def test_rename_link_and_symlink_are_refused_outside_the_outbox(lake: LakeStatus, lake_mount: Mount) -> None:
    """Outside the outbox the lake is read-only; inside it, rename works and links are EPERM
    (tests/fuse/test_outbox.py)."""
    assert lake.seed is not None
    dataset = lake_mount.mountpoint / lake.seed.sized_dataset.replace(":", "/", 1)
    existing = next(dataset.iterdir())
    calls = [(os.rename, existing, dataset / "renamed"), (os.link, existing, dataset / "linked"),
             (os.symlink, existing.name, dataset / "symlinked")]
    for call, first, second in calls:
        with pytest.raises(OSError) as refused:
            call(first, second)
        assert refused.value.errno == (errno.EROFS if os.getuid() == 0 else errno.EACCES), call
    assert not any((dataset / name).exists() for name in ("renamed", "linked", "symlinked"))


def test_chmod_chown_and_utime_in_the_outbox_are_accepted_without_effect(
    lake: LakeStatus, new_mount: Callable[..., Mount]
) -> None:
    _, target = waiting_file(lake, new_mount, b"data")
    before = os.stat(target)
    os.chmod(target, 0o600)
    os.utime(target, (1_000_000, 1_000_000))
    if os.getuid() == 0:
        os.chown(target, 4321, 4321)
    after = os.stat(target)
    assert (after.st_mode, after.st_mtime, after.st_uid, after.st_gid) == (
        before.st_mode, before.st_mtime, before.st_uid, before.st_gid)
    assert after.st_mode & 0o777 == 0o644
    assert target.read_bytes() == b"data"


def test_truncate_of_a_path_commits_at_once(
    lake: LakeStatus, new_mount: Callable[..., Mount], rucio_client: Any
) -> None:
    """No handle is open around truncate(2): the new size is committed by the call itself, so the
    upload that resumes at the next mount (with a working RSE) sends the truncated bytes."""
    broken, target = waiting_file(lake, new_mount, b"hello, world")
    scope, ds = target.parent.parent.name, target.parent.name
    os.truncate(target, 5)
    assert os.stat(target).st_size == 5 and not state(target).startswith("writing")
    done = broken.umount()
    assert done.returncode == 0, done.stderr
    resume_with_a_working_rse(broken, target)
    check_in_lake(rucio_client, lake, scope, ds, target.name, b"hello")


def test_mmap_needs_a_readable_handle_and_a_read_write_one_is_not_direct_io(
    lake: LakeStatus, new_mount: Callable[..., Mount]
) -> None:
    """A write-only handle bypasses the page cache, but mmap never meets it: the kernel refuses any
    mapping of a handle that cannot read (EACCES, as on every filesystem). A read-write handle keeps
    the page cache, so its shared writable mapping works."""
    _, target = waiting_file(lake, new_mount, b"")
    fd = os.open(target, os.O_WRONLY)
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(OSError) as refused:
            mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_WRITE)
        assert refused.value.errno == errno.EACCES
    finally:
        os.close(fd)
    fd = os.open(target, os.O_RDWR)
    try:
        with mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mapped:
            mapped[:5] = b"mmap!"
    finally:
        os.close(fd)
    assert target.read_bytes()[:5] == b"mmap!"


def test_a_kill_during_an_early_upload_leaves_nothing_registered(
    lake: LakeStatus, new_mount: Callable[..., Mount], rucio_client: Any
) -> None:
    """A file sent while it is written, its daemon killed before close(): at most a partial object
    at the file's storage path, registered nowhere, then or after the next mount."""
    assert lake.seed is not None
    mount = new_mount(ca_option(lake), "upload_while_writing=1M")
    mount.start()
    scope, ds, name = lake.seed.upload_scope, unique("ds"), unique("early")
    target = mount.mountpoint / ".outbox" / scope / ds / name
    target.parent.mkdir()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(4):
            os.write(fd, os.urandom(1 << 20))
        wait_until(lambda: f"event=upload-early-start did={scope}:{name}" in mount.daemon_log(),
                   what="the early upload to start")
        pid = mount.pid
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, timeout=30)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert uploaded(rucio_client, scope, name) is None
    mount.start()  # the same mount point: whatever the journal holds resumes
    assert mount.status()["outbox"]["queued"] == 0 and not target.exists()  # never committed
    assert uploaded(rucio_client, scope, name) is None
    partial = seed.rse_file(Path(lake.paths["scratch"]), scope, name)
    assert not partial.exists() or partial.stat().st_size <= 4 << 20


@pytest.fixture
def no_room_on_the_upload_rse(lake: LakeStatus, rucio_client: Any) -> Iterator[Callable[[], None]]:
    """The account's limit on the upload RSE set to 0 bytes; yields what gives the room back (the
    teardown does too)."""
    assert lake.seed is not None
    account, rse = rucio_client.account, lake.seed.scratch_rse
    before = rucio_client.get_local_account_limits(account)[rse]
    rucio_client.set_local_account_limit(account, rse, 0)

    def restore() -> None:
        rucio_client.set_local_account_limit(account, rse, before)

    yield restore
    restore()


def test_an_upload_over_quota_is_retried_and_goes_in_once_there_is_room(
    lake: LakeStatus, new_mount: Callable[..., Mount], rucio_client: Any,
    no_room_on_the_upload_rse: Callable[[], None],
) -> None:
    assert lake.seed is not None
    mount = new_mount(ca_option(lake))
    mount.start()
    scope, ds, name = lake.seed.upload_scope, unique("ds"), unique("f")
    target = mount.mountpoint / ".outbox" / scope / ds / name
    target.parent.mkdir()
    target.write_bytes(b"over quota")
    refused = wait_until(lambda: "(attempt 2 after:" in (text := state(target)) and text, what="a refused attempt")
    assert "InsufficientAccountLimit" in refused, refused  # Rucio refused the rule: over quota
    no_room_on_the_upload_rse()
    retried = datalakefs("outbox", "retry", str(target))
    assert retried.returncode == 0, retried.stderr
    wait_until(lambda: not target.exists(), what="the upload once there is room")
    check_in_lake(rucio_client, lake, scope, ds, name, b"over quota")
