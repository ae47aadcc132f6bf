"""The outbox through a real mount of the test lake: write, upload, errors, control (SPEC §5)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import secrets
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo.status import LakeStatus
from tests.fuse.mounting import Mount, datalakefs
from tests.fuse.waiting import wait_until

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

STATE = "user.datalakefs.state"


def unique(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def adler32(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def ca_option(lake: LakeStatus) -> str:
    return f"storage_ca_bundle={lake.datalakefs_config.parent / 'dav.crt'}"


@pytest.fixture(scope="module")
def outbox_mount(lake: LakeStatus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("outbox-mount")
    with Mount(base / "lake", lake.datalakefs_config, f"cache_dir={base / 'cache'}", f"state_dir={base / 'state'}",
               ca_option(lake), "upload_concurrency=2") as mount:
        yield mount


@pytest.fixture
def dataset(outbox_mount: Mount, lake: LakeStatus) -> tuple[Path, str, str]:
    """A fresh outbox dataset directory: (path, scope, dataset)."""
    assert lake.seed is not None
    scope = lake.seed.upload_scope
    name = unique("ds")
    path = outbox_mount.mountpoint / ".outbox" / scope / name
    path.mkdir()
    return path, scope, name


def cancel_between_attempts(act: Callable[[], Any]) -> None:
    """``rm`` (or ``outbox cancel``) of a file whose upload keeps failing: EBUSY while an attempt is in
    flight (documented), success once it is back in its backoff."""
    for _ in range(100):
        try:
            act()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
        time.sleep(0.1)
    raise AssertionError("the upload never left its attempt")


def fill(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(size >> 20):
            fh.write(os.urandom(1 << 20))
            fh.flush()


def uploaded(rucio_client: Any, scope: str, name: str) -> dict[str, Any] | None:
    from rucio.common.exception import DataIdentifierNotFound

    try:
        return dict(rucio_client.get_metadata(scope, name))
    except DataIdentifierNotFound:
        return None


def check_in_lake(rucio_client: Any, lake: LakeStatus, scope: str, dataset: str, name: str, data: bytes) -> None:
    assert lake.seed is not None
    meta = uploaded(rucio_client, scope, name)
    assert meta is not None and meta["bytes"] == len(data) and meta["adler32"] == adler32(data)
    replicas = list(rucio_client.list_replicas([{"scope": scope, "name": name}], all_states=True))
    states = replicas[0]["states"]
    assert states == {lake.seed.scratch_rse: "AVAILABLE"}
    content = [d["name"] for d in rucio_client.list_content(scope, dataset)]
    assert content.count(name) == 1
    # kept from the reaper by the dataset's rule on the upload RSE (its lock on the file comes from
    # Rucio's judge-evaluator), not by a rule of its own
    (rule,) = [r for r in rucio_client.list_did_rules(scope, dataset) if r["rse_expression"] == lake.seed.scratch_rse]
    assert rule["grouping"] == "DATASET" and rule["expires_at"] is None
    covering = wait_until(lambda: list(rucio_client.list_associated_rules_for_file(scope, name)),
                          what="the dataset rule's lock on the file")
    assert [r["id"] for r in covering] == [rule["id"]]


def test_sequential_file_is_uploaded_and_appears_in_its_dataset(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    path, scope, ds = dataset
    data = os.urandom(3 * (1 << 20) + 17)
    target = path / unique("seq")
    target.write_bytes(data)
    wait_until(lambda: not target.exists(), what="the file to leave the outbox")
    in_lake = outbox_mount.mountpoint / scope / ds / target.name
    assert in_lake.read_bytes() == data
    check_in_lake(rucio_client, lake, scope, ds, target.name, data)


def test_a_large_file_is_sent_while_it_is_written(
    new_mount: Callable[..., Mount], lake: LakeStatus, rucio_client: Any
) -> None:
    """upload_while_writing: the bytes go out as they are written; close() then only registers."""
    assert lake.seed is not None
    mount = new_mount(ca_option(lake), "upload_while_writing=2M")
    mount.start()
    scope, ds = lake.seed.upload_scope, unique("ds")
    path = mount.mountpoint / ".outbox" / scope / ds
    path.mkdir()
    target = path / unique("early")
    data = os.urandom(6 * (1 << 20) + 5)
    with open(target, "wb") as fh:
        for start in range(0, len(data), 1 << 20):
            fh.write(data[start : start + (1 << 20)])
            fh.flush()
            time.sleep(0.05)
    wait_until(lambda: not target.exists(), what="the file to leave the outbox")
    assert json.loads((mount.mountpoint / ".datalakefs" / "outbox.json").read_text())["summary"][
        "uploaded_while_writing"] == 1
    check_in_lake(rucio_client, lake, scope, ds, target.name, data)


def test_shared_mmap_writes_are_uploaded(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    """numpy.memmap-style output: a read-write handle keeps the page cache, so MAP_SHARED works
    (write-only handles bypass it: see SEMANTICS)."""
    path, scope, ds = dataset
    target = path / unique("mmap")
    data = os.urandom(3 * 4096 + 5)
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, len(data))
        with mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mapped:
            mapped[:] = data
            mapped.flush()
    finally:
        os.close(fd)
    wait_until(lambda: not target.exists(), what="the file to leave the outbox")
    check_in_lake(rucio_client, lake, scope, ds, target.name, data)


def test_random_writes_truncate_and_fsync(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    path, scope, ds = dataset
    target = path / unique("rand")
    model = bytearray()
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for offset, size in ((5000, 100), (0, 10), (1 << 20, 4096), (70, 2_000_000)):
            chunk = os.urandom(size)
            os.pwrite(fd, chunk, offset)
            model.extend(b"\0" * max(0, offset + size - len(model)))
            model[offset : offset + size] = chunk
        os.ftruncate(fd, 1_500_000)
        del model[1_500_000:]
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == bytes(model[:100])
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    wait_until(lambda: not target.exists(), what="the upload")
    check_in_lake(rucio_client, lake, scope, ds, target.name, bytes(model))


def test_empty_and_one_byte_files(outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any,
                                  lake: LakeStatus) -> None:
    path, scope, ds = dataset
    files = {unique("empty"): b"", unique("one"): b"x"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    wait_until(lambda: not any((path / n).exists() for n in files), what="the uploads")
    for name, data in files.items():
        check_in_lake(rucio_client, lake, scope, ds, name, data)


def test_writes_outside_the_outbox_are_refused(outbox_mount: Mount, lake: LakeStatus) -> None:
    assert lake.seed is not None
    scope_dir = outbox_mount.mountpoint / lake.seed.upload_scope
    for call in (lambda: (scope_dir / "new.txt").write_bytes(b"x"), lambda: (scope_dir / "newdir").mkdir(),
                 lambda: (outbox_mount.mountpoint / ".outbox" / "file").write_bytes(b"x")):
        with pytest.raises(OSError) as raised:
            call()
        # as root the kernel lets the call through and the daemon refuses it; others stop at 0555
        assert raised.value.errno == (errno.EROFS if os.getuid() == 0 else errno.EACCES)


def test_bad_scope_and_bad_names(outbox_mount: Mount, dataset: tuple[Path, str, str]) -> None:
    outbox = outbox_mount.mountpoint / ".outbox"
    with pytest.raises(OSError) as raised:
        (outbox / "no.such.scope").mkdir()
    assert raised.value.errno == errno.ENOENT
    path, scope, _ = dataset
    with pytest.raises(OSError) as raised:
        (outbox / scope / "bad name").mkdir()
    assert raised.value.errno == errno.EINVAL
    for bad in (".hidden", "with space", "x" * 251):
        with pytest.raises(OSError) as raised:
            (path / bad).write_bytes(b"x")
        assert raised.value.errno == errno.EINVAL, bad
    assert os.listdir(path) == []


def test_conflicting_content_fails_visibly_and_rm_removes_it(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    path, scope, ds = dataset
    name = unique("conflict")
    (path / name).write_bytes(b"first")
    wait_until(lambda: not (path / name).exists(), what="the first upload")
    (path / name).write_bytes(b"second version")
    state = wait_until(lambda: os.getxattr(path / name, STATE).decode().startswith("failed")
                       and os.getxattr(path / name, STATE).decode(), what="the conflict")
    assert "already exists" in state
    listing = json.loads((outbox_mount.mountpoint / ".datalakefs" / "outbox.json").read_text())
    assert [f["state"] for f in listing["files"] if f["name"] == name] == ["failed"]
    assert outbox_mount.status()["outbox"]["failed"] >= 1
    os.unlink(path / name)
    assert not (path / name).exists()
    check_in_lake(rucio_client, lake, scope, ds, name, b"first")


def test_storage_down_retries_then_resumes_after_remount(
    new_mount: Callable[..., Mount], lake: LakeStatus, rucio_client: Any
) -> None:
    """Uploads to an RSE that does not exist retry with the reason visible; rm cancels a queued file;
    umount warns; the next mount of the same mount point (with a working RSE) resumes the rest."""
    assert lake.seed is not None
    scope = lake.seed.upload_scope
    broken = new_mount(ca_option(lake), "upload_rse=NO_SUCH_RSE")
    broken.start()
    ds = unique("ds")
    path = broken.mountpoint / ".outbox" / scope / ds
    path.mkdir()
    keep, cancel = unique("keep"), unique("cancel")
    (path / keep).write_bytes(b"keep me")
    (path / cancel).write_bytes(b"cancel me")
    wait_until(lambda: "attempt" in os.getxattr(path / keep, STATE).decode(), what="a retry")
    cancel_between_attempts(lambda: os.unlink(path / cancel))
    listed = datalakefs("outbox", "list", str(broken.mountpoint))
    assert keep in listed.stdout and cancel not in listed.stdout
    down = datalakefs("umount", str(broken.mountpoint), "--config", str(broken.config), *[
        arg for option in broken.options for arg in ("-o", option)])
    assert down.returncode == 0
    assert "pending" in down.stderr and "resume" in down.stderr
    fixed = Mount(broken.mountpoint, broken.config, *[o for o in broken.options if not o.startswith("upload_rse")])
    with fixed:
        wait_until(lambda: not (fixed.mountpoint / ".outbox" / scope / ds / keep).exists(), what="the resumed upload")
    check_in_lake(rucio_client, lake, scope, ds, keep, b"keep me")
    assert uploaded(rucio_client, scope, cancel) is None


def test_cli_retry_and_cancel(new_mount: Callable[..., Mount], lake: LakeStatus) -> None:
    assert lake.seed is not None
    mount = new_mount(ca_option(lake), "upload_rse=NO_SUCH_RSE")
    mount.start()
    path = mount.mountpoint / ".outbox" / lake.seed.upload_scope / unique("ds")
    path.mkdir()
    target = path / unique("f")
    target.write_bytes(b"data")
    wait_until(lambda: "(attempt 3 after:" in os.getxattr(target, STATE).decode(), what="a second retry")
    retried = datalakefs("outbox", "retry", str(target))
    assert retried.returncode == 0, retried.stderr
    # the retry starts the count again: only it can bring "attempt 3" back to "attempt 2"
    wait_until(lambda: "(attempt 2 after:" in os.getxattr(target, STATE).decode(), what="the retried attempt")

    def cancel() -> None:
        done = datalakefs("outbox", "cancel", str(target))
        if done.returncode != 0:
            raise OSError(errno.EBUSY if "busy" in done.stderr else errno.EIO, done.stderr)

    cancel_between_attempts(cancel)
    assert not target.exists()
    assert json.loads((mount.mountpoint / ".datalakefs" / "outbox.json").read_text())["files"] == []


def test_full_spool_gives_enospc_and_keeps_what_was_committed(
    new_mount: Callable[..., Mount], lake: LakeStatus, tmp_path: Path, rucio_client: Any
) -> None:
    assert lake.seed is not None
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(spool)], check=True)
    try:
        mount = new_mount(ca_option(lake), f"spool_dir={spool}", "spool_reserve=0")
        mount.start()
        scope, ds = lake.seed.upload_scope, unique("ds")
        path = mount.mountpoint / ".outbox" / scope / ds
        path.mkdir()
        small, big = unique("small"), unique("big")
        data = os.urandom(1 << 20)
        (path / small).write_bytes(data)
        with pytest.raises(OSError) as raised:
            fill(path / big, 16 << 20)
        assert raised.value.errno == errno.ENOSPC
        wait_until(lambda: not (path / small).exists(), what="the committed file's upload")
        check_in_lake(rucio_client, lake, scope, ds, small, data)
        mount.stop()
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)
