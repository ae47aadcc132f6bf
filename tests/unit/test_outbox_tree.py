"""The /.outbox subtree through the Filesystem (no mount): names, attributes, write calls, xattrs."""

from __future__ import annotations

import errno
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.catalogue.fake import FakeCatalogue
from datalakefs.catalogue.rucio_upload import check_did_name
from datalakefs.catalogue.upload import Registration, UploadJob
from datalakefs.config import Config
from datalakefs.errors import DatalakeError
from datalakefs.fs.attributes import Attributes, Ownership
from datalakefs.fs.filesystem import Filesystem
from datalakefs.fs.lake import LakeTree
from datalakefs.fs.outbox import OutboxTree
from datalakefs.namespace.inodes import ROOT_INODE, InodeTable
from datalakefs.namespace.tree import Namespace
from datalakefs.outbox.journal import Journal
from datalakefs.outbox.service import Outbox
from tests.unit.test_filesystem import listed_names


class Uploader:
    def __init__(self) -> None:
        self.jobs: list[UploadJob] = []

    def check_name(self, name: str) -> None:
        check_did_name(name)

    def locate(self, jobs: Sequence[UploadJob]) -> list[str | Exception | None]:
        return [f"fake://{job.name}" for job in jobs]

    def store(self, job: UploadJob, url: str) -> None:
        self.jobs.append(job)

    def register(self, registrations: Sequence[Registration]) -> list[Exception | None]:
        return [None] * len(registrations)


class _NoContent:
    async def open(self, info: object, nonblocking: bool) -> None:
        raise AssertionError("not read here")

    def cached_bytes(self, info: object) -> int:
        return 0

    def state(self, info: object) -> str:
        return ""


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Filesystem, Outbox, Uploader, list[tuple[int, str]]]:
    fake = FakeCatalogue()
    fake.add_scope("user.x")
    fake.add_scope("phys")
    catalogue = CachedCatalogue(fake, Config())
    uploader = Uploader()
    outbox = Outbox(Journal(tmp_path / "journal.sqlite"), uploader, catalogue, tmp_path / "spool")
    namespace = Namespace(catalogue, InodeTable())
    tree = OutboxTree(outbox, namespace, catalogue.list_scopes, Ownership(1000, 1000))
    invalidated: list[tuple[int, str]] = []
    tree.invalidate_entry = lambda parent, name: invalidated.append((parent, name))
    lake = LakeTree(namespace, catalogue, _NoContent(), {}, Ownership(1000, 1000))  # type: ignore[arg-type]
    fs = Filesystem(namespace, lake, outbox=tree)
    return fs, outbox, uploader, invalidated




async def _new_dataset(fs: Filesystem) -> Attributes:
    """``.outbox/user.x/ds``, made through the filesystem."""
    scope = await fs.lookup((await fs.lookup(ROOT_INODE, ".outbox")).ino, "user.x")
    return await fs.mkdir(scope.ino, "ds")


async def test_write_close_upload_and_leave(parts: tuple[Filesystem, Outbox, Uploader, list[tuple[int, str]]]) -> None:
    fs, outbox, uploader, invalidated = parts
    assert (await listed_names(fs, ROOT_INODE))[0] == ".outbox"
    top = await fs.lookup(ROOT_INODE, ".outbox")
    assert await listed_names(fs, top.ino) == ["phys", "user.x"]
    scope = await fs.lookup(top.ino, "user.x")
    dataset = await fs.mkdir(scope.ino, "ds")
    assert stat.S_IMODE(dataset.mode) == 0o755 and dataset.volatile
    fh, attrs, _ = await fs.create(dataset.ino, "f.dat")
    assert stat.S_IMODE(attrs.mode) == 0o644
    assert await fs.write(fh, 0, b"hello") == 5
    assert (await fs.getattr(attrs.ino)).size == 5
    assert await fs.read(fh, 1, 3) == b"ell"
    assert await fs.getxattr(attrs.ino, "user.datalakefs.state") == b"writing"
    await fs.flush(fh)
    assert await fs.getxattr(attrs.ino, "user.datalakefs.state") == b"queued"
    await fs.release(fh)
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        with trio.fail_after(10):
            while not invalidated:  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert invalidated == [(dataset.ino, "f.dat")]
    assert [job.name for job in uploader.jobs] == ["f.dat"]
    assert await listed_names(fs, dataset.ino) == []


async def test_write_only_handles_bypass_the_page_cache(
    parts: tuple[Filesystem, Outbox, Uploader, list[tuple[int, str]]]
) -> None:
    fs, _, _, _ = parts
    dataset = await _new_dataset(fs)
    _, attrs, direct_io = await fs.create(dataset.ino, "w.dat", readable=False)
    assert direct_io
    _, _, direct_io = await fs.create(dataset.ino, "rw.dat", readable=True)
    assert not direct_io  # shared mmap needs the page cache
    assert (await fs.open(attrs.ino, write=True, nonblocking=False, readable=False))[2]
    assert not (await fs.open(attrs.ino, write=False, nonblocking=False))[2]
    assert not (await fs.open(attrs.ino, write=True, nonblocking=False, readable=True))[2]


async def test_truncate_unlink_and_refusals(parts: tuple[Filesystem, Outbox, Uploader, list[tuple[int, str]]]) -> None:
    fs, outbox, _, _ = parts
    top = await fs.lookup(ROOT_INODE, ".outbox")
    scope = await fs.lookup(top.ino, "user.x")
    dataset = await fs.mkdir(scope.ino, "ds")
    fh, attrs, _ = await fs.create(dataset.ino, "g.dat")
    await fs.write(fh, 0, b"0123456789")
    assert (await fs.setattr(attrs.ino, 4)).size == 4
    await fs.flush(fh)
    await fs.release(fh)
    await fs.setxattr(attrs.ino, "user.datalakefs.state", b"cancel")
    assert await listed_names(fs, dataset.ino) == []
    fh, attrs, _ = await fs.create(dataset.ino, "h.dat")
    await fs.write(fh, 0, b"mapped")  # mmap writes reach the daemon after the last flush
    await fs.release(fh)  # the last release commits them
    assert await fs.getxattr(attrs.ino, "user.datalakefs.state") == b"queued"
    await fs.unlink(dataset.ino, "h.dat")
    assert await listed_names(fs, dataset.ino) == []
    expected = [
        (fs.create(scope.ino, "direct.dat"), errno.EROFS),
        (fs.mkdir(top.ino, "no.such.scope"), errno.ENOENT),
        (fs.mkdir(top.ino, "phys"), errno.EEXIST),
        (fs.mkdir(dataset.ino, "deeper"), errno.EINVAL),
        (fs.create(dataset.ino, "with space"), errno.EINVAL),
        (fs.mkdir(ROOT_INODE, "new"), errno.EROFS),
        (fs.setxattr(dataset.ino, "user.datalakefs.state", b"retry"), errno.EROFS),
    ]
    for call, code in expected:
        with pytest.raises(DatalakeError) as raised:
            await call
        assert raised.value.errno == code
    await fs.rmdir(scope.ino, "ds")
    assert await listed_names(fs, scope.ino) == []
    assert outbox.listing() == []


async def test_unknown_handles_are_ebadf_and_links_eperm(
    parts: tuple[Filesystem, Outbox, Uploader, list[tuple[int, str]]]
) -> None:
    fs, _, _, _ = parts
    dataset = await _new_dataset(fs)
    for call in (fs.read(999, 0, 1), fs.write(999, 0, b"x")):
        with pytest.raises(DatalakeError) as raised:
            await call
        assert raised.value.errno == errno.EBADF
    with pytest.raises(DatalakeError) as raised:
        fs.refuse_link(dataset.ino, "link")
    assert raised.value.errno == errno.EPERM
    with pytest.raises(DatalakeError) as raised:
        fs.refuse_link(ROOT_INODE, "symlink")
    assert raised.value.errno == errno.EROFS


async def test_readdir_builds_outbox_entries_every_time(
    parts: tuple[Filesystem, Outbox, Uploader, list[tuple[int, str]]]
) -> None:
    """Outbox attributes change (a file grows): nothing built from them is kept."""
    fs, _, _, _ = parts
    dataset = await _new_dataset(fs)
    fh, _, _ = await fs.create(dataset.ino, "f.dat")
    sizes = []
    for data in (b"a", b"bc"):
        await fs.write(fh, 0, data)
        listing = await fs.opendir(dataset.ino)
        sizes += [entry.size for _, _, _, entry in await fs.readdir(listing, 0, lambda attributes: attributes)]
        fs.releasedir(listing)
    assert sizes == [1, 2]


async def test_an_outbox_entry_forgotten_while_its_directory_is_open_is_handed_out_anew(
    parts: tuple[Filesystem, Outbox, Uploader, list[tuple[int, str]]]
) -> None:
    fs, _, _, _ = parts
    dataset = await _new_dataset(fs)
    await fs.create(dataset.ino, "f.dat")
    listing = await fs.opendir(dataset.ino)
    [(_, _, first, _)] = await fs.readdir(listing, 0, lambda attributes: attributes)
    fs.remember_each([first])
    fs.forget(first, 2)  # create's reference and the listing's
    [(_, _, again, attributes)] = await fs.readdir(listing, 0, lambda attributes: attributes)
    fs.releasedir(listing)
    assert again != first and attributes.ino == again
    assert (await fs.getattr(again)).ino == again
