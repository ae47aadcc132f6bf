"""The outbox through a real mount of the test lake: write, upload, errors, control (SPEC §5)."""

from __future__ import annotations

import contextlib
import ctypes
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
    for bad in ("with space", "x" * 251, "-dash-first"):  # (".hidden" is a temporary name: allowed)
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


# -- the semantics table of docs/SEMANTICS.md, row by row -------------------------------------------
#
# A file is uploaded only once no writer has it open: each test below keeps an extra descriptor open
# ("pinned") while it changes a file, so that the version it checks in the lake is decided by the
# semantics, not by how fast the uploader is.


@contextlib.contextmanager
def pinned(path: Path) -> Iterator[None]:
    """Keep ``path`` (created empty when missing) open for writing, so it is not uploaded meanwhile."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        yield
    finally:
        os.close(fd)


def landed(rucio_client: Any, lake: LakeStatus, mount: Mount, dataset: tuple[Path, str, str], name: str,
           data: bytes) -> None:
    """``name`` leaves the outbox and the lake holds exactly ``data``, read back through the mount."""
    path, scope, ds = dataset
    wait_until(lambda: not (path / name).exists(), what=f"the upload of {name}")
    check_in_lake(rucio_client, lake, scope, ds, name, data)
    assert (mount.mountpoint / scope / ds / name).read_bytes() == data


def test_shell_rewrite_with_o_trunc_lands_only_the_new_content(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    """The issue's report: `seq 1 200000 > f; echo hi > f` put 1,288,895 bytes starting "hi\\n\\n3"."""
    path, _, _ = dataset
    name = unique("shell")
    with pinned(path / name):
        subprocess.run(["sh", "-c", f"seq 1 200000 > {name}; echo hi > {name}"], cwd=path, check=True)
        assert (path / name).read_bytes() == b"hi\n"
        assert os.stat(path / name).st_size == 3
    landed(rucio_client, lake, outbox_mount, dataset, name, b"hi\n")


def test_append_adds_to_the_committed_content(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    path, _, _ = dataset
    name = unique("append")
    with pinned(path / name):
        subprocess.run(["sh", "-c", f"echo first > {name}; echo second >> {name}; echo third >> {name}"], cwd=path,
                       check=True)
    landed(rucio_client, lake, outbox_mount, dataset, name, b"first\nsecond\nthird\n")


def test_truncate_down_and_up_and_pwrite_into_committed_bytes(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    path, _, _ = dataset
    name = unique("trunc")
    data = os.urandom(3 << 20)
    with pinned(path / name):
        (path / name).write_bytes(data)  # committed and queued
        fd = os.open(path / name, os.O_WRONLY)
        try:
            os.ftruncate(fd, 1000)  # down, into committed bytes
            os.ftruncate(fd, 5000)  # up: zeros
            os.pwrite(fd, b"XY", 10)  # into what the commit had
        finally:
            os.close(fd)
        os.truncate(path / name, 4000)  # truncate(2) of the path
        expected = data[:10] + b"XY" + data[12:1000] + b"\0" * 3000
        assert (path / name).read_bytes() == expected
    landed(rucio_client, lake, outbox_mount, dataset, name, expected)


def test_a_rewrite_that_is_not_closed_leaves_the_last_closed_version(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    """fsync() commits; what follows it is uploaded only when it is committed too (here at close)."""
    path, _, _ = dataset
    name = unique("fsync")
    fd = os.open(path / name, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"version one, a bit longer")
        os.fsync(fd)
        assert os.getxattr(path / name, STATE) == b"queued"
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"v2", 0)
        assert os.getxattr(path / name, STATE) == b"writing"
        assert (path / name).read_bytes() == b"v2"
    finally:
        os.close(fd)
    landed(rucio_client, lake, outbox_mount, dataset, name, b"v2")


def test_mmap_writes_after_the_last_close_are_committed_at_release(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    """mmap, close(fd), write through the mapping, munmap without msync: the pages reach the daemon
    after the last flush, and the release commits them. (libc's mmap: Python's mmap keeps a dup of
    the descriptor, whose close would be one more flush.)"""
    path, _, _ = dataset
    name = unique("mmaplate")
    data = os.urandom(2 * 4096 + 7)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path / name, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, len(data))
    address = libc.mmap(None, len(data), mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    os.close(fd)  # the last flush: the file is committed with zeros...
    assert os.getxattr(path / name, STATE) == b"queued"
    ctypes.memmove(address, data, len(data))  # ...then written through the mapping
    assert libc.munmap(address, len(data)) == 0  # the pages go out, then the release
    landed(rucio_client, lake, outbox_mount, dataset, name, data)


def test_temporary_name_renamed_to_its_final_name_like_rsync(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    path, _, _ = dataset
    name = unique("synced")
    temporary = path / f".{name}.Xy12Ab"
    data = os.urandom(70_000)
    temporary.write_bytes(data)
    state = os.getxattr(temporary, STATE).decode()
    assert state.startswith("kept: a temporary name"), state
    assert temporary.name in os.listdir(path)
    os.rename(temporary, path / name)
    assert not temporary.exists()
    landed(rucio_client, lake, outbox_mount, dataset, name, data)


def test_rsync_into_the_outbox(outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any,
                               lake: LakeStatus, tmp_path: Path) -> None:
    """rsync's default: write `.name.XXXXXX`, close, rename to `name` (rsync is a system package of
    scripts/install-system-packages.sh)."""
    path, _, _ = dataset
    source = tmp_path / "src"
    source.mkdir()
    files = {unique("rs"): os.urandom(size) for size in (0, 1, 200_000)}
    for name, data in files.items():
        (source / name).write_bytes(data)
    done = subprocess.run(["rsync", "-r", "--no-perms", "--no-times", f"{source}/", f"{path}/"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    for name, data in files.items():
        landed(rucio_client, lake, outbox_mount, dataset, name, data)


def test_rename_replaces_a_queued_file_and_refuses_what_it_cannot_do(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    path, scope, _ = dataset
    old, new = unique("old"), unique("new")
    with pinned(path / new):
        (path / new).write_bytes(b"replaced")
        with pinned(path / old):
            (path / old).write_bytes(b"the winner")
            with pytest.raises(OSError) as raised:
                os.rename(path / old, path / "not a DID name")
            assert raised.value.errno == errno.EINVAL
            other = outbox_mount.mountpoint / ".outbox" / scope / unique("ds")
            other.mkdir()
            with pytest.raises(OSError) as raised:
                os.rename(path / old, other / old)
            assert raised.value.errno == errno.EXDEV  # mv copies instead
            os.rename(path / old, path / new)
            assert sorted(os.listdir(path)) == [new]
            assert (path / new).read_bytes() == b"the winner"
    landed(rucio_client, lake, outbox_mount, dataset, new, b"the winner")
    assert uploaded(rucio_client, scope, old) is None


def test_hard_links_and_symlinks_are_eperm(outbox_mount: Mount, dataset: tuple[Path, str, str]) -> None:
    path, _, _ = dataset
    name = unique("linked")
    with pinned(path / name):
        with pytest.raises(OSError) as raised:
            os.link(path / name, path / unique("hard"))
        assert raised.value.errno == errno.EPERM
        with pytest.raises(OSError) as raised:
            os.symlink(name, path / unique("soft"))
        assert raised.value.errno == errno.EPERM
        os.unlink(path / name)


def test_rm_racing_the_uploader_is_either_cancelled_or_uploaded(
    outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any, lake: LakeStatus
) -> None:
    """rm right after close(), while the uploader picks the file: never both cancelled and uploaded,
    never a crash of the mount."""
    path, scope, _ = dataset
    cancelled, kept = [], []
    for n in range(12):
        name = unique(f"race{n}")
        (path / name).write_bytes(os.urandom(n * 10_000))
        try:
            os.unlink(path / name)
            cancelled.append(name)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOENT):  # uploading, or already done
                raise
            kept.append(name)
    wait_until(lambda: not os.listdir(path), what="the outbox to drain")
    assert outbox_mount.status()["outbox"]["failed"] == 0
    for name in cancelled:
        assert uploaded(rucio_client, scope, name) is None, name
    for name in kept:
        assert uploaded(rucio_client, scope, name) is not None, name


def test_tar_extracts_into_the_outbox(outbox_mount: Mount, dataset: tuple[Path, str, str], rucio_client: Any,
                                      lake: LakeStatus, tmp_path: Path) -> None:
    path, _, _ = dataset
    files = {unique("tarred"): os.urandom(size) for size in (5, 300_000)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    subprocess.run(["tar", "-cf", str(tmp_path / "a.tar"), "-C", str(tmp_path), *files], check=True)
    done = subprocess.run(["tar", "-xf", str(tmp_path / "a.tar"), "-C", str(path)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    for name, data in files.items():
        landed(rucio_client, lake, outbox_mount, dataset, name, data)
