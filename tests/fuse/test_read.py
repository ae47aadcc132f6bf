"""Reading file contents through a real mount of the test lake (issue 5, SPEC §3)."""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import threading
import time
import tomllib
import uuid
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from datalakefs.demo import seed
from datalakefs.demo.lake import Lake
from datalakefs.demo.seed import content
from datalakefs.demo.status import LakeStatus
from tests.faults.origin import FaultyOrigin
from tests.fuse.mounting import Mount, datalakefs
from tests.fuse.tcpproxy import TcpProxy
from tests.fuse.test_browse import calls, path_of
from tests.fuse.waiting import wait_until

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

MIB = 1 << 20
SIZE = 64 * MIB


def _file(lake: LakeStatus, mount: Mount, size: int = SIZE) -> tuple[str, Path]:
    did = lake.seed.sized_files[size]
    return did, path_of(mount, did, lake.seed.sized_dataset)


def _expected(lake: LakeStatus, did: str, size: int, offset: int = 0, length: int | None = None) -> bytes:
    return content(lake.seed.content_key, did, size, offset, length)


def _content_stats(mount: Mount) -> dict[str, Any]:
    stats: dict[str, Any] = mount.status()["content"]
    return stats


def _settled_cached_bytes(path: Path) -> int:
    """``user.datalakefs.cached`` once it stopped growing for half a second."""
    deadline = time.monotonic() + 30
    last = -1
    while (cached := int(os.getxattr(path, "user.datalakefs.cached"))) != last and time.monotonic() < deadline:
        last = cached
        time.sleep(0.5)
    return cached


def _evict_pages(path: Path) -> None:
    """Drop the file's pages from the kernel's page cache, so that the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_all(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def test_sequential_read_matches_the_catalogue_checksum(lake: LakeStatus, new_mount: Any) -> None:
    mount = new_mount("xcache=none")
    mount.start()
    _, path = _file(lake, mount)
    data = _read_all(path)
    assert len(data) == SIZE
    assert f"{zlib.adler32(data):08x}" == os.getxattr(path, "user.rucio.adler32").decode()
    assert int(os.getxattr(path, "user.datalakefs.cached")) == SIZE
    stats = _content_stats(mount)
    assert stats["bytes_fetched"] == SIZE  # each byte fetched once
    assert stats["verified_files"] == 1
    assert os.getxattr(path, "user.datalakefs.state") == b"stream: cached, verified"


def test_the_kernel_reads_ahead_a_mebibyte_at_a_time(lake: LakeStatus, new_mount: Any) -> None:
    """The mount's read-ahead is raised after INIT (the INIT reply sets it back to 128 KiB): the kernel
    then sends 1 MiB READs, each a block, instead of 8 requests of 128 KiB (8× the per-request work)."""
    mount = new_mount("xcache=none")
    mount.start()
    dev = os.stat(mount.mountpoint).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert int(bdi.read_text()) == 1024  # Config.read_ahead_kb


def test_random_reads_return_the_right_bytes_and_move_only_what_they_touch(
    lake: LakeStatus, new_mount: Any
) -> None:
    mount = new_mount("xcache=none")
    mount.start()
    did, path = _file(lake, mount)
    rng = random.Random(7)
    offsets = [rng.randrange(SIZE - 5000) for _ in range(40)]
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in offsets:
            assert os.pread(fd, 4096, offset) == _expected(lake, did, SIZE, offset, 4096)
    finally:
        os.close(fd)
    stats = _content_stats(mount)
    assert stats["piece_requests"] > 0
    assert stats["bytes_fetched"] <= SIZE // 4
    assert os.pread(os.open(path, os.O_RDONLY), 10, SIZE - 10) == _expected(lake, did, SIZE, SIZE - 10)


def test_each_random_read_costs_one_request_of_just_its_page(lake: LakeStatus, new_mount: Any) -> None:
    """Reads near each other (a page apart) but not continuing each other are random, not a stream."""
    mount = new_mount("xcache=none")
    mount.start()
    did, path = _file(lake, mount)
    offsets = [start + page * 2 * 4096 for start in (40 * MIB, 9 * MIB) for page in range(5)]
    before = _content_stats(mount)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # the kernel asks for just the page read
        for offset in offsets:
            assert os.pread(fd, 4096, offset) == _expected(lake, did, SIZE, offset, 4096)
    finally:
        os.close(fd)
    after = _content_stats(mount)
    assert after["requests"] - before["requests"] == len(offsets)
    assert after["piece_requests"] - before["piece_requests"] == len(offsets)
    assert after["bytes_fetched"] - before["bytes_fetched"] == 4096 * len(offsets)


@pytest.mark.parametrize("readers", [4, 16])
def test_parallel_readers_of_one_file_each_stream_their_part_and_fetch_it_once(
    lake: LakeStatus, new_mount: Any, readers: int
) -> None:
    """Readers of one cold file, each reading its own part: each gets its own window (large requests,
    not piece reads; the readers share one window's worth), and no GET fetches a block another
    reader fetched or has on the way."""
    mount = new_mount("xcache=none")
    mount.start()
    did, path = _file(lake, mount)
    part = SIZE // readers
    got: dict[int, bytes] = {}

    def read_part(k: int) -> None:
        with open(path, "rb", buffering=0) as fh:
            fh.seek(k * part)
            chunks = []
            while (left := part - sum(map(len, chunks))) > 0:
                chunks.append(fh.read(min(MIB, left)))
            got[k] = b"".join(chunks)

    threads = [threading.Thread(target=read_part, args=(k,)) for k in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(readers):
        assert got[k] == _expected(lake, did, SIZE, k * part, part), k
    stats = _content_stats(mount)
    assert stats["bytes_fetched"] == SIZE  # each byte once, whoever asked first
    assert stats["piece_requests"] <= readers  # at most each reader's first read
    assert stats["requests"] <= readers * 8  # windows that grow, not a GET per read


def test_cached_bytes_and_status_grow_as_the_file_is_read(lake: LakeStatus, new_mount: Any) -> None:
    mount = new_mount("xcache=none")
    mount.start()
    did, path = _file(lake, mount)
    assert int(os.getxattr(path, "user.datalakefs.cached")) == 0
    before = _content_stats(mount)
    with open(path, "rb") as fh:
        assert fh.read(8 * MIB) == _expected(lake, did, SIZE, 0, 8 * MIB)
    cached = _settled_cached_bytes(path)  # read-ahead may still be filling blocks after read() returned
    assert 8 * MIB <= cached <= SIZE
    after = _content_stats(mount)
    assert after["misses"] > before["misses"]
    assert after["requests"] > before["requests"]
    assert after["bytes_fetched"] >= 8 * MIB
    assert after["cache"]["used_bytes"] == cached


def test_reads_go_through_the_xcache(lake: LakeStatus, new_mount: Any) -> None:
    """The lake's XCache keeps what it cached across sessions, so its disk proves nothing about this
    read: the mount reaches that XCache through a proxy here, which sees the file's bytes pass."""
    xcache = urlsplit(tomllib.loads(lake.datalakefs_config.read_text())["xcache"])
    proxy = TcpProxy((xcache.hostname or "127.0.0.1", xcache.port or 80))
    try:
        mount = new_mount(f"xcache=http://127.0.0.1:{proxy.port}")
        mount.start()
        did, path = _file(lake, mount, MIB + 1)
        assert _read_all(path) == _expected(lake, did, MIB + 1)
        stats = _content_stats(mount)
    finally:
        proxy.close()
    assert proxy.answered >= MIB + 1  # the bytes came back through the XCache...
    assert stats["failed_requests"] == 0  # ...and not from a fallback to the replica
    scope, name = did.split(":", 1)
    from datalakefs.demo.seed import rse_file

    relative = rse_file(Path(lake.paths["origin"]), scope, name).relative_to(Path(lake.paths["rse"]))
    cached = Path(lake.paths["xcache"]) / relative
    assert cached.exists() and cached.stat().st_blocks > 0  # XCache holds what we read through it


def test_failover_when_the_first_replica_fails(lake: LakeStatus, new_mount: Any) -> None:
    """The XCache is tried first; pointed at an origin that answers 503 to everything, reads fall over
    to the catalogue's replica and still return the right bytes."""
    with FaultyOrigin({}, fault_rate=1.0, faults=["status"]) as broken:
        mount = new_mount(f"xcache={broken.base}", "http_retries=0")
        mount.start()
        did, path = _file(lake, mount, MIB + 1)
        assert _read_all(path) == _expected(lake, did, MIB + 1)
        stats = _content_stats(mount)
    assert broken.requests, "the broken first candidate was never asked"
    assert stats["failed_requests"] >= 1


def test_a_dead_xcache_costs_a_dataset_one_failed_connection_not_one_per_file(
    lake: LakeStatus, new_mount: Any, rucio_client: Any
) -> None:
    """The XCache is down (its port refuses): the first file falls over to the replica, and the next
    files of the dataset go to the replica first instead of each trying the XCache again."""
    plan = _small_dataset(lake, rucio_client, 12)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    mount = new_mount(f"xcache={dead}", "http_retries=0", "listing_prefetch_files=0")
    mount.start()
    directory = mount.mountpoint / plan.scope / plan.name
    for spec in plan.files:
        assert _read_all(directory / spec.name) == _expected(lake, spec.did, spec.size)
    assert _content_stats(mount)["failed_requests"] == 1


def test_a_corrupt_cache_block_is_fetched_again_never_served(
    lake: LakeStatus, new_mount: Any, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "shared-cache"
    first = new_mount("xcache=none", f"cache_dir={cache_dir}")
    first.start()
    did, path = _file(lake, first)
    expected = _expected(lake, did, SIZE)
    assert _read_all(path) == expected
    first.stop()
    (data_file,) = cache_dir.rglob("*.data")
    with open(data_file, "r+b") as fh:
        fh.seek(2 * MIB + 12345)
        fh.write(b"\xff" * 64)
    second = new_mount("xcache=none", f"cache_dir={cache_dir}")
    second.start()
    assert _read_all(_file(lake, second)[1]) == expected
    stats = _content_stats(second)
    assert stats["cache"]["corrupt_blocks"] >= 1
    assert 0 < stats["bytes_fetched"] <= 2 * MIB


def test_cache_stats_and_clear_through_a_mount_and_offline(lake: LakeStatus, new_mount: Any) -> None:
    mount = new_mount("xcache=none")
    mount.start()
    did, path = _file(lake, mount, MIB + 1)
    assert _read_all(path) == _expected(lake, did, MIB + 1)
    cli = ["--config", str(mount.config), *(arg for option in mount.options for arg in ("-o", option))]

    shown = datalakefs("cache", "stats", "--json", *cli)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["source"] == str(mount.mountpoint)
    assert report["cache"]["used_bytes"] == MIB + 1
    assert report["bytes_fetched"] >= MIB + 1

    cleared = datalakefs("cache", "clear", str(mount.mountpoint), *cli)
    assert cleared.returncode == 0, cleared.stderr
    assert _content_stats(mount)["cache"]["used_bytes"] == 0
    assert int(os.getxattr(path, "user.datalakefs.cached")) == 0
    _evict_pages(path)
    assert _read_all(path) == _expected(lake, did, MIB + 1)  # fetched again
    assert int(os.getxattr(path, "user.datalakefs.cached")) == MIB + 1

    mount.stop()
    offline = json.loads(datalakefs("cache", "stats", "--json", *cli).stdout)
    assert offline["cache"]["used_bytes"] == MIB + 1
    assert datalakefs("cache", "clear", *cli).returncode == 0
    assert json.loads(datalakefs("cache", "stats", "--json", *cli).stdout)["cache"]["used_bytes"] == 0


def _replica_calls(mount: Mount) -> int:
    return int(mount.status()["catalogue"]["calls"].get("list_replicas", 0))


def _small_dataset(lake: LakeStatus, client: Any, count: int) -> seed.DatasetPlan:
    assert lake.seed is not None
    scope = lake.seed.upload_scope
    name = f"per_dataset_{uuid.uuid4().hex[:10]}"
    files = tuple(seed.FileSpec(scope, f"{name}.{index:03d}.txt", 100 + index) for index in range(count))
    plan = seed.DatasetPlan(scope, name, files)
    seed.add_origin_dataset(client, Lake(lake.state_dir), plan)
    return plan


def test_a_file_the_storage_serves_wrong_is_refused_and_read_anew_once_it_is_right(
    lake: LakeStatus, new_mount: Any, rucio_client: Any
) -> None:
    """The storage's copy of a file is not the catalogue's (a byte changed on disk): reading it to the
    end fails with EIO. Once the storage has the right bytes again, reading it again (a new open, as a
    rerun does) returns them: neither the daemon's memory nor the kernel's page cache keeps any of
    the bad copy, though its first blocks had been served before the checksum could fail."""
    assert lake.seed is not None
    spec = seed.FileSpec(lake.seed.upload_scope, f"wrong_{uuid.uuid4().hex[:10]}.bin", 3 * (1 << 20) + 5)
    dataset = seed.DatasetPlan(spec.scope, spec.name + ".ds", (spec,))
    seed.add_origin_dataset(rucio_client, Lake(lake.state_dir), dataset)
    stored = seed.rse_file(Lake(lake.state_dir).layout.origin, spec.scope, spec.name)
    right = stored.read_bytes()
    bad = right[:1000] + bytes([right[1000] ^ 0xFF]) + right[1001:]
    stored.write_bytes(bad)
    mount = new_mount("xcache=none")
    mount.start()
    path = mount.mountpoint / spec.scope / dataset.name / spec.name
    served = bytearray()

    def read_to_the_end() -> None:
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(256 << 10):
                served.extend(chunk)

    with pytest.raises(OSError) as failed:
        read_to_the_end()
    assert failed.value.errno == errno.EIO
    # before the check failed, the bad copy's first blocks were served (or none, when the whole file
    # had arrived before the first read returned); never more than the file's first blocks
    assert served == bad[: len(served)] and len(served) < len(bad)
    stored.write_bytes(right)
    assert _read_all(path) == right
    assert _content_stats(mount)["verified_files"] == 1


def test_ls_l_and_reading_every_file_of_a_dataset_ask_the_catalogue_per_dataset(
    lake: LakeStatus, new_mount: Any, rucio_client: Any
) -> None:
    plan = _small_dataset(lake, rucio_client, 40)
    mount = new_mount()
    mount.start()
    before = calls(mount)
    directory = mount.mountpoint / plan.scope / plan.name
    entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    assert [(entry.name, entry.stat().st_size) for entry in entries] == [(f.name, f.size) for f in plan.files]
    for spec, entry in zip(plan.files, entries, strict=True):
        assert _read_all(Path(entry.path)) == _expected(lake, spec.did, spec.size)
    assert _replica_calls(mount) == 1
    assert calls(mount) - before <= 5  # scope and dataset lookups, the listing, its times, the replicas


def test_reading_every_file_of_the_10k_dataset_costs_one_replica_call(lake: LakeStatus, new_mount: Any) -> None:
    assert lake.seed is not None
    mount = new_mount()
    mount.start()
    directory = path_of(mount, lake.seed.dataset_10k)
    entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    assert len(entries) == 10_000
    scope = lake.seed.dataset_10k.split(":", 1)[0]
    for entry in entries:
        size = entry.stat().st_size
        assert _read_all(Path(entry.path)) == _expected(lake, f"{scope}:{entry.name}", size), entry.name
    calls = mount.status()["catalogue"]["calls"]
    # the first batch's answer; the rest presumed from it: at one of the RSEs holding every file of it
    # (one or, once test_staging has staged the dataset, two), named as the catalogue named them there
    assert (calls["list_replicas"], calls["derive_pfns"]) == (1, 1)


def test_a_file_not_where_the_rest_of_its_dataset_is_is_found_by_asking_the_catalogue(
    lake: LakeStatus, new_mount: Any, rucio_client: Any
) -> None:
    assert lake.seed is not None
    plan = _small_dataset(lake, rucio_client, 150)  # the first replica batch holds files 0-99
    moved = plan.files[120]
    layout = Lake(lake.state_dir).layout
    written = seed.write_file(layout.scratch, lake.seed.content_key, moved)
    rucio_client.add_replicas(lake.seed.scratch_rse, [written.as_did()])
    # gone from the origin: its replica there unavailable (no account may delete origin replicas), its bytes removed
    gone = {"scope": moved.scope, "name": moved.name, "state": "U"}
    rucio_client.update_replicas_states(lake.seed.origin_rse, [gone])
    seed.rse_file(layout.origin, moved.scope, moved.name).unlink()
    mount = new_mount()
    mount.start()
    directory = mount.mountpoint / plan.scope / plan.name
    for spec in plan.files:
        assert _read_all(directory / spec.name) == _expected(lake, spec.did, spec.size), spec.name
    # the first batch; then, once the origin answered 404 for the moved file, its batch (100-149)
    assert _replica_calls(mount) == 2
    assert os.getxattr(directory / moved.name, "user.rucio.replicas").decode() == lake.seed.scratch_rse


@pytest.mark.parametrize(("xcache_rses", "refused"), [((), False), (("",), True)])
def test_a_file_on_an_rse_the_xcache_does_not_front_is_read_directly(
    lake: LakeStatus, new_mount: Any, rucio_client: Any, xcache_rses: tuple[str, ...], refused: bool
) -> None:
    """The lake's XCache fronts its origin only (the lake's config says so with ``xcache_rses``): a file
    on SCRATCH is read from SCRATCH, not first asked of the XCache, which refuses it."""
    assert lake.seed is not None
    plan = _small_dataset(lake, rucio_client, 1)
    [spec] = plan.files
    layout = Lake(lake.state_dir).layout
    written = seed.write_file(layout.scratch, lake.seed.content_key, spec)
    rucio_client.add_replicas(lake.seed.scratch_rse, [written.as_did()])
    rucio_client.update_replicas_states(lake.seed.origin_rse, [{"scope": spec.scope, "name": spec.name, "state": "U"}])
    options = [f"xcache_rses={rse}" for rse in xcache_rses]  # "xcache_rses=": every RSE, the default's behaviour
    mount = new_mount(*options)
    mount.start()
    assert _read_all(mount.mountpoint / plan.scope / plan.name / spec.name) == _expected(lake, spec.did, spec.size)
    assert (_content_stats(mount)["failed_requests"] > 0) == refused


def test_a_datasets_new_replicas_are_seen_after_the_ttl(
    lake: LakeStatus, new_mount: Any, rucio_client: Any
) -> None:
    assert lake.seed is not None
    plan = _small_dataset(lake, rucio_client, 3)
    mount = new_mount("catalogue_ttl=2")
    mount.start()
    paths = [mount.mountpoint / plan.scope / plan.name / spec.name for spec in plan.files]
    os.listdir(paths[0].parent)

    def rses(path: Path) -> set[str]:
        return set(os.getxattr(path, "user.rucio.replicas").decode().split(","))

    assert [rses(path) for path in paths] == [{lake.seed.origin_rse}] * 3
    assert _replica_calls(mount) == 1
    scope = plan.scope
    rucio_client.add_replicas(lake.seed.scratch_rse, [
        {"scope": scope, "name": spec.name, "bytes": spec.size,
         "adler32": f"{zlib.adler32(_expected(lake, spec.did, spec.size)):08x}"}
        for spec in plan.files
    ])
    assert rses(paths[1]) == {lake.seed.origin_rse}  # still the cached answer
    both = {lake.seed.origin_rse, lake.seed.scratch_rse}
    deadline = time.monotonic() + 60
    while rses(paths[0]) != both:
        assert time.monotonic() < deadline, "the new replica never showed"
        time.sleep(0.2)
    assert [rses(path) for path in paths] == [both] * 3
    assert _replica_calls(mount) == 2  # the whole dataset again, once


def _prefetching_mount(
    lake: LakeStatus, new_mount: Any, rucio_client: Any
) -> tuple[Any, seed.DatasetPlan, Path, list[str]]:
    """A mount prefetching 8 files ahead, a new dataset of 40 files, its directory and its listing."""
    plan = _small_dataset(lake, rucio_client, 40)
    mount = new_mount("listing_prefetch_files=8")
    mount.start()
    directory = mount.mountpoint / plan.scope / plan.name
    return mount, plan, directory, sorted(os.listdir(directory))


def test_an_open_out_of_listing_order_starts_no_prefetch(
    lake: LakeStatus, new_mount: Any, rucio_client: Any
) -> None:
    mount, _, directory, names = _prefetching_mount(lake, new_mount, rucio_client)
    for name in (names[0], names[1], names[30]):  # in order, then the pattern breaks
        _read_all(directory / name)
    wait_until(lambda: mount.status()["prefetch"]["in_flight"] == 0, timeout=60, what="the prefetch settled")
    assert mount.status()["prefetch"]["started"] > 0  # the first opens in order did start one
    beyond = [int(os.getxattr(directory / name, "user.datalakefs.cached")) for name in names[31:39]]
    assert beyond == [0] * 8  # a reader that jumped is not followed


def test_two_readers_interleaved_in_a_dataset_each_find_their_next_files_prefetched(
    lake: LakeStatus, new_mount: Any, rucio_client: Any
) -> None:
    mount, _, directory, names = _prefetching_mount(lake, new_mount, rucio_client)
    for first, second in ((0, 20), (1, 21)):  # two workers, each given half of the listing
        _read_all(directory / names[first])
        _read_all(directory / names[second])
    ahead = [directory / name for name in names[2:10] + names[22:30]]
    wait_until(lambda: all(int(os.getxattr(path, "user.datalakefs.cached")) == path.stat().st_size
                           for path in ahead), timeout=60, what="both readers' next files fetched ahead")
    assert mount.status()["prefetch"]["cancelled"] == 0


def test_a_reader_going_through_a_dataset_finds_the_next_files_prefetched(
    lake: LakeStatus, new_mount: Any, rucio_client: Any
) -> None:
    mount, plan, directory, names = _prefetching_mount(lake, new_mount, rucio_client)
    for spec in plan.files[:3]:
        assert _read_all(directory / spec.name) == _expected(lake, spec.did, spec.size)
    ahead = [directory / name for name in names[3:3 + 8]]
    wait_until(lambda: all(int(os.getxattr(path, "user.datalakefs.cached")) == path.stat().st_size
                           for path in ahead), timeout=60, what="the next files fetched ahead of the reader")
    assert int(os.getxattr(directory / names[20], "user.datalakefs.cached")) == 0  # beyond the window
    assert mount.status()["prefetch"]["failed"] == 0
    for spec in plan.files[3:11]:  # what was prefetched reads as it should
        assert _read_all(directory / spec.name) == _expected(lake, spec.did, spec.size)
