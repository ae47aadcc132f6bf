"""The filesystem over a fake catalogue: tree, attributes, identity, xattrs, errors."""

from __future__ import annotations

import gc
import stat
import tracemalloc
from collections.abc import Hashable, Iterator

import pytest

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.catalogue.fake import FakeCatalogue
from datalakefs.config import Config
from datalakefs.errors import (
    CatalogueUnavailableError,
    NoAttributeError,
    NotFoundError,
    NotSupportedError,
    ReadOnlyError,
)
from datalakefs.fs.attributes import Attributes, Ownership
from datalakefs.fs.filesystem import CLEAR_CACHE_XATTR, Filesystem
from datalakefs.fs.lake import LakeTree
from datalakefs.model import DID, DIDInfo, DIDType
from datalakefs.namespace.inodes import ROOT_INODE, InodeTable, Node, NodeKind
from datalakefs.namespace.tree import Namespace


class _NoContent:
    """Content service stand-in: these tests never read file data."""

    def __init__(self) -> None:
        self.opened: list[DIDInfo] = []
        self.cleared = 0

    async def open(self, info: DIDInfo, nonblocking: bool) -> _NoContent:
        self.opened.append(info)
        return self

    @property
    def keep_cache(self) -> bool:
        return True

    async def read(self, offset: int, size: int) -> bytes:
        return b""

    async def close(self) -> None:
        return None

    def cached_bytes(self, info: DIDInfo) -> int:
        return 7

    def state(self, info: DIDInfo) -> str:
        return "streaming"

    async def clear(self) -> None:
        self.cleared += 1


@pytest.fixture
def fake() -> FakeCatalogue:
    lake = FakeCatalogue()
    for scope in ("phys", "user.jdoe", "calib"):
        lake.add_scope(scope)
    lake.add_container("phys:run2024")
    lake.add_dataset("phys:raw")
    lake.add_dataset("phys:reco")
    lake.add_file("phys:f1.root", 100, "0000abcd", "md5md5")
    lake.add_file("calib:const.db", 5)
    lake.add_file("phys:a/b/c.dat", 3)
    lake.add_file("phys:unattached", 9)
    lake.attach("phys:run2024", "phys:raw", "phys:reco")
    lake.attach("phys:raw", "phys:f1.root", "calib:const.db", "phys:a/b/c.dat")
    lake.attach("phys:reco", "phys:f1.root")
    lake.add_replica("phys:f1.root", "LAKE-ORIGIN", "http://127.0.0.1:1/f1.root")
    lake.add_replica("phys:f1.root", "SCRATCH", "https://127.0.0.1:2/f1.root")
    lake.set_metadata("phys:raw", "datatype", "RAW")
    return lake


@pytest.fixture
def content() -> _NoContent:
    return _NoContent()


@pytest.fixture
def fs(fake: FakeCatalogue, content: _NoContent) -> Filesystem:
    config = Config()
    catalogue = CachedCatalogue(fake, config)
    namespace = Namespace(catalogue, InodeTable(), control_files=("status.json",))
    return Filesystem(namespace, LakeTree(namespace, catalogue, content, {"status.json": lambda: b'{"ok": 1}\n'},
                                          Ownership(1000, 1000)))


def _built(attributes: Attributes) -> Attributes:
    """What the FUSE layer builds from a readdir entry's attributes, here the attributes themselves."""
    return attributes


async def listed_names(fs: Filesystem, ino: int) -> list[str]:
    fh = await fs.opendir(ino)
    try:
        return [name for _, name, _, _ in await fs.readdir(fh, 0, _built)]
    finally:
        fs.releasedir(fh)


async def _path(fs: Filesystem, *parts: str) -> int:
    ino = ROOT_INODE
    for part in parts:
        ino = (await fs.lookup(ino, part)).ino
    return ino


async def test_tree(fs: Filesystem) -> None:
    assert await listed_names(fs, ROOT_INODE) == [".datalakefs", ".query", "calib", "phys", "user.jdoe"]
    phys = await _path(fs, "phys")
    assert await listed_names(fs, phys) == ["run2024", "raw", "reco"]
    raw = await _path(fs, "phys", "raw")
    assert await listed_names(fs, raw) == ["f1.root", "calib:const.db", "a%2Fb%2Fc.dat"]
    assert await listed_names(fs, await _path(fs, "phys", "run2024")) == ["raw", "reco"]


async def test_attributes(fs: Filesystem) -> None:
    attrs = await fs.lookup(await _path(fs, "phys", "raw"), "f1.root")
    assert attrs.size == 100
    assert stat.S_IMODE(attrs.mode) == 0o644  # the owner's w bit: setting user.datalakefs.stage needs it
    assert stat.S_ISREG(attrs.mode)
    assert (attrs.uid, attrs.gid) == (1000, 1000)
    assert attrs.mtime > 1_600_000_000
    directory = await fs.getattr(await _path(fs, "phys", "raw"))
    assert stat.S_IMODE(directory.mode) == 0o755
    assert directory.is_dir


@pytest.mark.parametrize(("owner", "file_mode", "dir_mode"), [
    (Ownership(1000, 100), 0o644, 0o755),
    (Ownership(1000, 100, umask=0o002), 0o664, 0o775),
    (Ownership(1000, 100, umask=0o077), 0o600, 0o700),
    (Ownership(1000, 100, read_only=True), 0o444, 0o555),
    (Ownership(1000, 100, umask=0o002, read_only=True), 0o444, 0o555),
])
def test_ownership_modes(owner: Ownership, file_mode: int, dir_mode: int) -> None:
    assert owner.file_mode == stat.S_IFREG | file_mode
    assert owner.dir_mode == stat.S_IFDIR | dir_mode


async def test_file_in_two_datasets_is_one_inode(fs: Filesystem) -> None:
    in_raw = await fs.lookup(await _path(fs, "phys", "raw"), "f1.root")
    in_reco = await fs.lookup(await _path(fs, "phys", "reco"), "f1.root")
    assert in_raw == in_reco


async def test_unlisted_did_resolves_in_its_scope(fs: Filesystem) -> None:
    attrs = await fs.lookup(await _path(fs, "phys"), "unattached")
    assert attrs.size == 9
    with pytest.raises(NotFoundError):
        await fs.lookup(await _path(fs, "phys"), "nothing-here")
    with pytest.raises(NotFoundError):
        await fs.lookup(ROOT_INODE, "no-such-scope")


async def test_escaped_name_resolves(fs: Filesystem) -> None:
    attrs = await fs.lookup(await _path(fs, "phys"), "a%2Fb%2Fc.dat")
    assert attrs.size == 3


async def test_query_directory(fs: Filesystem) -> None:
    result = await _path(fs, ".query", "phys", "datatype=RAW")
    assert await listed_names(fs, result) == ["raw"]
    wildcard = await _path(fs, ".query", "phys", "f*")
    assert await listed_names(fs, wildcard) == ["f1.root"]


async def test_xattrs(fs: Filesystem, fake: FakeCatalogue) -> None:
    ino = await _path(fs, "phys", "raw", "f1.root")
    assert await fs.getxattr(ino, "user.rucio.adler32") == b"0000abcd"
    assert await fs.getxattr(ino, "user.rucio.did_type") == b"FILE"
    assert await fs.getxattr(ino, "user.rucio.replicas") == b"LAKE-ORIGIN,SCRATCH"
    assert await fs.getxattr(ino, "user.datalakefs.cached") == b"7"
    calls = sum(fake.calls.values())
    with pytest.raises(NoAttributeError):
        await fs.getxattr(ino, "user.unknown")
    for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
        with pytest.raises(NotSupportedError):  # `ls -l` stops asking after one EOPNOTSUPP
            await fs.getxattr(ino, name)
    assert sum(fake.calls.values()) == calls
    assert "user.rucio.md5" in fs.listxattr(ino)


async def test_writes_are_refused(fs: Filesystem) -> None:
    ino = await _path(fs, "phys", "raw", "f1.root")
    with pytest.raises(ReadOnlyError):
        await fs.open(ino, write=True, nonblocking=False)
    with pytest.raises(ReadOnlyError):
        fs.refuse_write("mkdir")


async def test_the_cache_is_cleared_through_the_control_directory_only(fs: Filesystem, content: _NoContent) -> None:
    await fs.setxattr(await _path(fs, ".datalakefs"), CLEAR_CACHE_XATTR, b"1")
    assert content.cleared == 1
    for ino in (await _path(fs, "phys", "raw", "f1.root"), await _path(fs, ".datalakefs", "status.json")):
        with pytest.raises(ReadOnlyError):
            await fs.setxattr(ino, CLEAR_CACHE_XATTR, b"1")
    with pytest.raises(ReadOnlyError):
        await fs.setxattr(await _path(fs, ".datalakefs"), "user.other", b"1")
    assert content.cleared == 1


async def test_control_file(fs: Filesystem) -> None:
    ino = await _path(fs, ".datalakefs", "status.json")
    fh, keep_cache, direct_io = await fs.open(ino, write=False, nonblocking=False)
    assert (keep_cache, direct_io) == (False, True)
    assert await fs.read(fh, 0, 100) == b'{"ok": 1}\n'
    await fs.release(fh)


async def test_outage_is_eio_and_recovers(fs: Filesystem, fake: FakeCatalogue) -> None:
    fake.fail(CatalogueUnavailableError("server down"))
    with pytest.raises(CatalogueUnavailableError):
        await fs.lookup(ROOT_INODE, "phys")
    fake.fail(None)
    assert (await fs.lookup(ROOT_INODE, "phys")).is_dir


async def test_forget_releases_listed_nodes(fs: Filesystem) -> None:
    raw = await _path(fs, "phys", "raw")
    fh = await fs.opendir(raw)
    inos = [ino for _, _, ino, _ in await fs.readdir(fh, 0, _built)]
    for ino in inos:
        fs.remember(ino)
    fs.releasedir(fh)
    first = inos[0]
    assert (await fs.getattr(first)).size == 100
    fs.forget(first, 1)
    with pytest.raises(NotFoundError):
        await fs.getattr(first)


async def test_a_listing_hands_out_known_nodes_only(fs: Filesystem) -> None:
    """Nodes of a listing are built once; one the kernel forgot is replaced, never handed out stale."""
    raw = await _path(fs, "phys", "raw")

    async def listed() -> dict[str, int]:
        fh = await fs.opendir(raw)
        try:
            entries = {name: ino for _, name, ino, _ in await fs.readdir(fh, 0, _built)}
        finally:
            fs.releasedir(fh)
        for ino in entries.values():
            fs.remember(ino)
        return entries

    first = await listed()
    assert await listed() == first
    fs.forget(first["f1.root"], 2)
    again = await listed()
    assert again["f1.root"] != first["f1.root"]
    assert {name: ino for name, ino in again.items() if name != "f1.root"} == {
        name: ino for name, ino in first.items() if name != "f1.root"}
    for ino in again.values():
        assert (await fs.getattr(ino)).ino == ino
    in_reco = await fs.lookup(await _path(fs, "phys", "reco"), "f1.root")  # one inode per file DID
    assert in_reco.ino == again["f1.root"]


@pytest.mark.parametrize("times_limit", [1, 1000])
async def test_entries_of_a_large_listing_show_their_directorys_times(
    fake: FakeCatalogue, content: _NoContent, times_limit: int
) -> None:
    fake.add_file("phys:late.root", 4)
    fake.attach("phys:raw", "phys:late.root")
    catalogue = CachedCatalogue(fake, Config())
    namespace = Namespace(catalogue, InodeTable(), times_limit=times_limit)
    fs = Filesystem(namespace, LakeTree(namespace, catalogue, content, {}, Ownership(1000, 1000)))
    raw = await _path(fs, "phys", "raw")  # looked up by name: the dataset's own times
    raw_info = await catalogue.get_info(DID.parse("phys:raw"))
    fh = await fs.opendir(raw)
    entries = {name: attributes for _, name, _, attributes in await fs.readdir(fh, 0, _built)}
    fs.releasedir(fh)
    own = {name: await catalogue.get_info(DID.parse(f"phys:{name}")) for name in ("f1.root", "late.root")}
    assert entries["late.root"].size == 4
    if times_limit == 1:  # 4 entries: above the limit, no metadata call, the dataset's times
        assert fake.calls["get_infos"] == 0
        assert {(a.mtime, a.ctime) for a in entries.values()} == {(raw_info.updated_at, raw_info.created_at)}
    else:
        for name, info in own.items():
            assert (entries[name].mtime, entries[name].ctime) == (info.updated_at, info.created_at)
    assert own["late.root"].created_at != raw_info.created_at  # the two cases are told apart


class _Stager:
    def __init__(self) -> None:
        self.staged: list[tuple[DIDInfo, bytes]] = []

        self.looked_up: list[DIDInfo] = []

    async def stage(self, info: DIDInfo, value: bytes) -> None:
        self.staged.append((info, value))

    async def look_up(self, info: DIDInfo) -> None:
        self.looked_up.append(info)


async def test_stage_xattr_goes_to_the_stager_and_other_xattrs_are_read_only(fake: FakeCatalogue) -> None:
    config = Config()
    catalogue = CachedCatalogue(fake, config)
    stager = _Stager()
    namespace = Namespace(catalogue, InodeTable())
    fs = Filesystem(namespace, LakeTree(namespace, catalogue, _NoContent(), {}, Ownership(1000, 1000), stager=stager))
    raw = await _path(fs, "phys", "raw")
    assert fs.listxattr(raw)[-1] == "user.datalakefs.state"
    assert await fs.getxattr(raw, "user.datalakefs.state") == b"streaming"
    assert [info.did.name for info in stager.looked_up] == ["raw"]  # rules made elsewhere are asked for first
    await fs.setxattr(raw, "user.datalakefs.stage", b"1")
    assert [(info.did.name, value) for info, value in stager.staged] == [("raw", b"1")]
    with pytest.raises(ReadOnlyError):
        await fs.setxattr(raw, "user.rucio.name", b"x")
    with pytest.raises(ReadOnlyError):
        await fs.setxattr(ROOT_INODE, "user.datalakefs.stage", b"1")


async def test_readdir_builds_each_lake_entry_once_per_node(fs: Filesystem) -> None:
    """What the FUSE layer builds from an entry's attributes is kept with the node: listing again
    builds nothing, and a node the kernel forgot (replaced when listed again) is built anew."""
    raw = await _path(fs, "phys", "raw")
    built: list[int] = []

    def build(attributes: Attributes) -> tuple[str, int]:
        built.append(attributes.ino)
        return ("entry", attributes.ino)

    async def listed() -> dict[str, tuple[int, tuple[str, int]]]:
        fh = await fs.opendir(raw)
        try:
            entries = {name: (ino, entry) for _, name, ino, entry in await fs.readdir(fh, 0, build)}
        finally:
            fs.releasedir(fh)
        fs.remember_each(ino for ino, _ in entries.values())
        return entries

    first = await listed()
    assert sorted(built) == sorted(ino for ino, _ in first.values())
    assert all(entry == ("entry", ino) for ino, entry in first.values())
    assert await listed() == first and len(built) == len(first)
    forgotten = first["f1.root"][0]
    fs.forget(forgotten, 2)
    again = await listed()
    assert built[len(first):] == [again["f1.root"][0]] and again["f1.root"][0] != forgotten


class _CollectorWatchingTable(InodeTable):
    """Records whether the garbage collector was running at each node made."""

    def __init__(self) -> None:
        super().__init__()
        self.collecting: list[bool] = []

    def intern(self, key: Hashable, kind: NodeKind, parent: int, did: DID | None = None,
               info: DIDInfo | None = None, scope: str | None = None, label: str = "") -> Node:
        self.collecting.append(gc.isenabled())
        return super().intern(key, kind, parent, did, info, scope, label)


async def test_a_listings_nodes_are_made_with_the_collector_paused(fake: FakeCatalogue, content: _NoContent) -> None:
    """datalakefs/gcpause.py; names and nodes of a listing are made in one go, never across an await."""
    catalogue = CachedCatalogue(fake, Config())
    table = _CollectorWatchingTable()
    namespace = Namespace(catalogue, table)
    fs = Filesystem(namespace, LakeTree(namespace, catalogue, content, {}, Ownership(1000, 1000)))
    raw = await _path(fs, "phys", "raw")
    enabled = gc.isenabled()
    gc.enable()
    try:
        del table.collecting[:]
        assert await listed_names(fs, raw) == ["f1.root", "calib:const.db", "a%2Fb%2Fc.dat"]
        assert table.collecting == [False] * 3 and gc.isenabled()
    finally:
        if not enabled:
            gc.disable()


async def test_an_entry_forgotten_while_its_directory_is_open_is_handed_out_anew(fs: Filesystem) -> None:
    """The kernel may forget entries of a READDIRPLUS reply it could not pass on (the reader's buffer was
    full) and ask for them again: they get a live inode, never the dead one (a stat of it failed, and its
    FORGET took the mount down)."""
    raw = await _path(fs, "phys", "raw")
    fh = await fs.opendir(raw)
    try:
        first = {name: ino for _, name, ino, _ in await fs.readdir(fh, 0, _built)}
        fs.remember_each(first.values())
        fs.forget(first["f1.root"], 1)  # the kernel's only reference
        again = {name: (ino, attributes) for _, name, ino, attributes in await fs.readdir(fh, 0, _built)}
        fs.remember_each(ino for ino, _ in again.values())
    finally:
        fs.releasedir(fh)
    renewed, attributes = again["f1.root"]
    assert renewed != first["f1.root"] and attributes.ino == renewed
    assert (await fs.getattr(renewed)).size == 100
    assert {name: ino for name, (ino, _) in again.items() if name != "f1.root"} == {
        name: ino for name, ino in first.items() if name != "f1.root"}
    fs.forget(renewed, 1)
    with pytest.raises(NotFoundError):
        await fs.getattr(renewed)


class _PrebuiltListing:
    """A backend whose dataset listing is built before the measurement."""

    def __init__(self, files: list[DIDInfo]) -> None:
        self.files = files

    def list_files(self, did: DID) -> Iterator[list[DIDInfo]]:
        yield self.files

    def get_info(self, did: DID) -> DIDInfo:
        return DIDInfo(did, DIDType.DATASET)

    def list_scopes(self) -> list[str]:
        return ["s"]


async def test_a_listed_directory_costs_no_pair_per_entry() -> None:
    """A directory of 20,000 files, listed: names and nodes are kept as parallel sequences (a pair
    per entry cost 55 bytes more each); what is left is the nodes, the name index and the table's
    records of each node."""
    files = [DIDInfo(DID("s", f"big.{i:05d}"), DIDType.FILE, size=1) for i in range(20_000)]
    catalogue = CachedCatalogue(_PrebuiltListing(files), Config())  # type: ignore[arg-type]
    namespace = Namespace(catalogue, InodeTable())
    scope = await namespace.lookup(namespace.inodes.get(ROOT_INODE), "s")
    dataset = await namespace.lookup(scope, "big")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        entries = await namespace.list_dir(dataset)
        await entries.ready(0)  # the nodes, built as readdir asks for them
        per_file = (tracemalloc.get_traced_memory()[0] - before) / len(files)
    finally:
        tracemalloc.stop()
    assert len(entries.nodes) == len(files)
    assert per_file < 290, per_file  # 321 with a pair per entry, 266 without
