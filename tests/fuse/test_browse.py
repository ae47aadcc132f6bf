"""Browsing the real test lake through a real mount (issue 4, SPEC §2)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo.status import LakeStatus
from datalakefs.model import DID
from datalakefs.namespace.escaping import component_for
from tests.fuse.mounting import Mount
from tests.fuse.tcpproxy import TcpProxy
from tests.fuse.waiting import wait_until

pytestmark = [pytest.mark.lake, pytest.mark.fuse]


def path_of(mount: Mount, did_text: str, *parents: str) -> Path:
    """The path of a DID: under its parent collections when given, else straight under its scope."""
    did = DID.parse(did_text)
    if not parents:
        return mount.mountpoint / did.scope / component_for(did, did.scope)
    first = DID.parse(parents[0])
    path = mount.mountpoint / first.scope / component_for(first, first.scope)
    scope = first.scope
    for parent in parents[1:]:
        parent_did = DID.parse(parent)
        path /= component_for(parent_did, scope)
        scope = parent_did.scope
    return path / component_for(did, scope)


def calls(mount: Mount) -> int:
    return sum(mount.status()["catalogue"]["calls"].values())


def test_root_lists_the_scopes(lake: LakeStatus, lake_mount: Mount) -> None:
    names = set(os.listdir(lake_mount.mountpoint))
    assert set(lake.seed.scopes) <= names
    assert {".datalakefs", ".query"} <= names


def test_container_holds_its_datasets(lake: LakeStatus, lake_mount: Mount) -> None:
    container = DID.parse(lake.seed.container)
    listed = set(os.listdir(path_of(lake_mount, lake.seed.container)))
    expected = {component_for(DID.parse(child), container.scope) for child in lake.seed.container_children}
    assert listed == expected


def test_sizes_modes_and_owner(lake: LakeStatus, lake_mount: Mount) -> None:
    for size, did in lake.seed.sized_files.items():
        st = os.stat(path_of(lake_mount, did, lake.seed.sized_dataset))
        assert st.st_size == size
        assert stat.S_IMODE(st.st_mode) == 0o644
        assert st.st_uid == os.getuid()
    directory = os.stat(path_of(lake_mount, lake.seed.sized_dataset))
    assert stat.S_ISDIR(directory.st_mode)
    assert stat.S_IMODE(directory.st_mode) == 0o755


def test_file_in_two_datasets_has_one_inode(lake: LakeStatus, lake_mount: Mount) -> None:
    stats = [os.stat(path_of(lake_mount, lake.seed.multi_dataset_file, dataset))
             for dataset in lake.seed.multi_dataset_file_datasets]
    assert len({(st.st_ino, st.st_size, st.st_mtime) for st in stats}) == 1


def test_cross_scope_content_is_scope_qualified(lake: LakeStatus, lake_mount: Mount) -> None:
    dataset = DID.parse(lake.seed.cross_scope_dataset)
    names = os.listdir(path_of(lake_mount, lake.seed.cross_scope_dataset))
    assert names
    assert all(name.split(":", 1)[0] != dataset.scope for name in names)
    assert all(":" in name for name in names)


def test_escaped_names_round_trip(lake: LakeStatus, lake_mount: Mount) -> None:
    directory = path_of(lake_mount, lake.seed.escaped_dataset)
    names = os.listdir(directory)
    seen = {os.getxattr(directory / name, "user.rucio.name").decode() for name in names}
    assert {DID.parse(did).name for did in lake.seed.escaped_names} <= seen
    assert all("/" not in name and len(name.encode()) <= 255 for name in names)


def test_no_name_leaves_the_mount(lake: LakeStatus, lake_mount: Mount) -> None:
    directory = path_of(lake_mount, lake.seed.traversal_dataset)
    for name in os.listdir(directory):
        resolved = (directory / name).resolve()
        assert resolved.is_relative_to(lake_mount.mountpoint.resolve())


def test_unlisted_did_resolves_by_name(lake: LakeStatus, lake_mount: Mount) -> None:
    big = DID.parse(lake.seed.big_file)
    assert os.stat(lake_mount.mountpoint / big.scope / component_for(big, big.scope)).st_size == 1 << 30
    with pytest.raises(FileNotFoundError):
        os.stat(lake_mount.mountpoint / big.scope / "no-such-did-anywhere")


def test_ls_l_of_10k_dataset_makes_no_per_file_call(lake: LakeStatus, lake_mount: Mount) -> None:
    directory = path_of(lake_mount, lake.seed.dataset_10k)
    before = calls(lake_mount)
    listing = subprocess.run(["ls", "-l", str(directory)], capture_output=True, text=True, check=True)
    assert len(listing.stdout.splitlines()) == 10_001
    assert calls(lake_mount) - before <= 3
    before = calls(lake_mount)
    subprocess.run(["ls", "-l", str(directory)], capture_output=True, check=True)
    assert calls(lake_mount) == before


def test_ls_l_of_a_large_dataset_is_stable_and_agrees_with_stat(lake: LakeStatus, lake_mount: Mount) -> None:
    """A 10k dataset (listed with ``list_files``, above the times limit): every entry, listed twice,
    has the same inode, size and time, ``stat`` agrees with the listing, and the entries show the
    dataset directory's time without a metadata call per entry or in bulk."""
    directory = path_of(lake_mount, lake.seed.dataset_10k)
    before = dict(lake_mount.status()["catalogue"]["calls"])

    def listed() -> dict[str, tuple[int, int, int]]:
        with os.scandir(directory) as entries:
            return {e.name: (e.inode(), (st := e.stat()).st_size, st.st_mtime_ns) for e in entries}

    first = listed()
    assert len(first) == 10_000
    assert listed() == first
    times = {mtime for _, _, mtime in first.values()}
    assert times == {os.stat(directory).st_mtime_ns}
    for name in sorted(first)[:: 997]:
        st = os.stat(directory / name)
        assert (st.st_ino, st.st_size, st.st_mtime_ns) == first[name]
        assert stat.S_ISREG(st.st_mode)
    after = lake_mount.status()["catalogue"]["calls"]
    assert after.get("get_infos", 0) == before.get("get_infos", 0)
    assert after.get("list_content", 0) - before.get("list_content", 0) <= 1


def test_a_large_directory_is_listed_while_its_answer_still_arrives(
    lake: LakeStatus, new_mount: Callable[..., Mount], proxied_rucio_config: tuple[Path, TcpProxy]
) -> None:
    """``ls`` of the 10k dataset gets its first entries while the rest of the catalogue's answer is
    held back on the wire, and every entry once it is let go; one catalogue call for it all."""
    config, proxy = proxied_rucio_config
    mount = new_mount(f"rucio_config={config}")
    mount.start()
    directory = path_of(mount, lake.seed.dataset_10k)
    os.stat(directory)  # the dataset's own facts: what follows is its listing only
    proxy.hold(after=700_000)  # two of the listing's 256 KiB chunks (about 4,600 of its rows), and some
    seen: list[str] = []
    listed = threading.Event()

    def list_it() -> None:
        with os.scandir(directory) as entries:
            seen.extend(entry.name for entry in entries)
        listed.set()

    reader = threading.Thread(target=list_it, daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(seen) > 1000 and proxy.holding, what="entries while the answer is held back")
        read = len(seen)  # the reader goes on meanwhile
        status = mount.status()
        assert status["catalogue"]["streaming"] == 1 and not listed.is_set()
        assert status["listing"]["entries_while_streaming"] >= read > 1000
    finally:
        proxy.release()
    reader.join(timeout=120)
    assert listed.is_set() and len(seen) == len(set(seen)) == 10_000
    status = mount.status()
    assert status["catalogue"]["streaming"] == 0 and status["catalogue"]["calls"]["list_content"] == 1
    assert sorted(os.listdir(directory)) == sorted(seen)  # cached whole: the same entries, no new call
    assert mount.status()["catalogue"]["calls"]["list_content"] == 1


def test_a_first_ls_after_mount_waits_for_three_catalogue_requests(
    lake: LakeStatus, new_mount: Callable[..., Mount], proxied_rucio_config: tuple[Path, TcpProxy]
) -> None:
    """The catalogue requests from mount to the last entry of ``ls -l <scope>/<dataset>``, as the
    server sees them, in order: the list of scopes, which the mount asks to prove its credentials and
    the lookup of the scope then finds cached (no ``whoami`` and its redirect); the dataset's own
    facts, since its type decides how it is listed; its files."""
    config, proxy = proxied_rucio_config

    def catalogue_requests() -> list[str]:  # token requests are rucio's own business
        return [request.partition("?")[0] for request in proxy.requests if " /auth/" not in request]

    mount = new_mount(f"rucio_config={config}")
    mount.start()
    assert catalogue_requests() == ["GET /scopes/"]
    directory = path_of(mount, lake.seed.dataset_10k)
    listing = subprocess.run(["ls", "-l", str(directory)], capture_output=True, text=True, check=True)
    assert len(listing.stdout.splitlines()) == 10_001
    did = DID.parse(lake.seed.dataset_10k)
    assert catalogue_requests() == ["GET /scopes/", f"GET /dids/{did.scope}/{did.name}/meta",
                                    f"GET /dids/{did.scope}/{did.name}/files"]


def test_opening_a_path_asks_for_the_replicas_while_the_datasets_times_are_asked(
    lake: LakeStatus, new_mount: Callable[..., Mount], proxied_rucio_config: tuple[Path, TcpProxy]
) -> None:
    """A script that opens a known path of a small dataset on a fresh mount: the lookup of the file
    lists the dataset and then asks for its entries' times (bulk metadata); the replicas the read
    needs are asked for while that call is in flight, not after it."""
    config, proxy = proxied_rucio_config
    mount = new_mount(f"rucio_config={config}")
    mount.start()
    path = path_of(mount, lake.seed.sized_files[1 << 20], lake.seed.sized_dataset)
    with open(path, "rb") as fh:
        assert len(fh.read(4096)) == 4096
    asked = [request.partition("?")[0] for request in proxy.requests]
    times, replicas = asked.index("POST /dids/bulkmeta"), asked.index("POST /replicas/list")
    assert proxy.answered_before[replicas] <= times, list(zip(asked, proxy.answered_before, strict=True))


def test_xattrs(lake: LakeStatus, lake_mount: Mount, rucio_client: Any) -> None:
    did = DID.parse(lake.seed.sized_files[1 << 20])
    path = path_of(lake_mount, lake.seed.sized_files[1 << 20], lake.seed.sized_dataset)
    dump = subprocess.run(["getfattr", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    assert f'user.rucio.scope="{did.scope}"' in dump
    assert 'user.rucio.did_type="FILE"' in dump
    assert len(os.getxattr(path, "user.rucio.adler32")) == 8
    # the dataset's listing (list_files) gives no md5: the file's own facts do
    assert os.getxattr(path, "user.rucio.md5").decode() == rucio_client.get_metadata(did.scope, did.name)["md5"]
    assert lake.seed.origin_rse in os.getxattr(path, "user.rucio.replicas").decode().split(",")
    before = calls(lake_mount)
    with pytest.raises(OSError) as missing:
        os.getxattr(path, "user.not.ours")
    assert missing.value.errno == errno.ENODATA
    assert calls(lake_mount) == before


def test_security_and_acl_xattrs_are_not_supported(lake: LakeStatus, lake_mount: Mount) -> None:
    """EOPNOTSUPP, not ENODATA: coreutils then stops asking for them, once per `ls -l` instead of per file."""
    path = path_of(lake_mount, lake.seed.sized_files[1 << 20], lake.seed.sized_dataset)
    for name in ("security.selinux", "system.posix_acl_access"):
        with pytest.raises(OSError) as refused:
            os.getxattr(path, name, follow_symlinks=False)
        assert refused.value.errno == errno.EOPNOTSUPP
    listing = subprocess.run(["strace", "-f", "-e", "trace=getxattr,lgetxattr", "ls", "-l", str(path.parent)],
                             capture_output=True, text=True, check=True)
    assert len([line for line in listing.stderr.splitlines() if "xattr(" in line]) <= 4


def test_status_json(lake_mount: Mount) -> None:
    status = lake_mount.status()
    assert status["version"]
    first = status["uptime_s"]
    wait_until(lambda: lake_mount.status()["uptime_s"] > first, what="the uptime to grow")
    assert status["catalogue"]["calls"]


def test_metadata_query_directory(lake: LakeStatus, lake_mount: Mount) -> None:
    query = lake.seed.metadata_query
    listed = os.listdir(lake_mount.mountpoint / ".query" / query.scope / query.filter)
    expected = {component_for(DID.parse(did), query.scope) for did in query.expected}
    assert set(listed) == expected


def test_writes_are_refused(lake: LakeStatus, lake_mount: Mount) -> None:
    dataset = path_of(lake_mount, lake.seed.sized_dataset)
    existing = next(dataset.iterdir())
    for attempt in (lambda: os.open(dataset / "new-file", os.O_WRONLY | os.O_CREAT), lambda: os.mkdir(dataset / "d"),
                    lambda: os.unlink(existing), lambda: os.open(existing, os.O_RDWR)):
        with pytest.raises(OSError) as refused:
            attempt()
        # as root the kernel lets the call through and the daemon refuses it; others stop at 0444/0555
        assert refused.value.errno == (errno.EROFS if os.getuid() == 0 else errno.EACCES)
