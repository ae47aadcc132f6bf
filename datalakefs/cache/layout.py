"""Cache keys, paths and the on-disk format.

Layout under the cache directory (``<cache_dir>/v3/``, directories 0700, files 0600)::

    v3/<d[:2]>/<d>.data     the file's bytes at their own offsets: a sparse file, holes where not cached
    v3/<d[:2]>/<d>.index    append-only journal: a FILE record, then BLOCK, DROP and VERIFIED records

except for a file of one block, whose journal follows its bytes in its one ``.data`` file::

    v3/<d[:2]>/<d>.data     the file's bytes, then its journal (FILE, BLOCK, VERIFIED), then a tail:
                            the journal's length (u32) and the magic ``DLFT``

``d`` is the SHA-256 of the :class:`FileKey` (DID, size, checksum): paths never contain a DID name, and
DIDs are immutable, so a key never refers to different bytes. Block ``i`` is file bytes
``[i*block_size, min(size, (i+1)*block_size))``.

Why one data file per DID rather than one file per block: creating a file costs ~600 µs of system CPU
on this project's machines (ext4), i.e. 0.6 s per GiB with 1 MiB block files, more than half the cold
CPU budget; one data file and one journal cost two creations per DID whatever its size. They sit side by side in
the prefix directory rather than in a directory of their own (format v1): a ``mkdir`` cost as much as
both files together, a third of the cache's system CPU on a dataset of small files. (The cost is
ext4's without a journal, as on these machines: it skips inodes freed in the last minutes, so a
creation scans past every file deleted recently, e.g. a cleared cache's: 16 µs of CPU on a quiet
filesystem, 130 µs after 20,000 deletions.)

A file of one block (format v3) costs one file creation: its journal is written once, whole, behind its
bytes (one ``pwrite``), with the verdict of its whole-file check (the block's adler32 against the
catalogue's): VERIFIED true or false. Its length is thus the same for every write of the file, so a
rewrite (a block fetched again) covers the last one exactly; it is never appended to. The data file's
size is then ``size`` plus the journal and its tail, and load() takes the journal only when the tail
accounts for exactly that and the journal is FILE, BLOCK, VERIFIED, all intact: anything else (a crash
before the journal was written, a torn or damaged one) drops the file.

Every record is framed as ``magic, type, payload length, payload, CRC32 of all that``. A BLOCK record
is the block's header: the key's digest, block index, file offset, data length, page size, adler32 of
the data, and a CRC32 per :data:`PAGE_SIZE` page of the data. A block is served only through a valid
record, and only pages whose CRC32 matches: a small read checks only the pages it touches. A torn or
damaged record ends the journal (later records are ignored and the blocks they describe are fetched
again); the data file's size is ``size`` from the start, so a truncated data file loses exactly the
blocks past its end.

Checksums come from zlib-ng (same algorithms as zlib): measured here, CRC32 runs at ~40 µs/MiB and
adler32 at ~20-35 µs/MiB against ~300-350 µs/MiB with the standard library. The whole file's adler32
is folded from the per-block adler32s with :func:`adler32_combine`, so checking a complete file
against the catalogue never re-reads it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import errno
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

from zlib_ng import zlib_ng

from datalakefs.model import DID, DIDInfo

PAGE_SIZE = 64 << 10
MIB = 1 << 20
MAX_BLOCK_SIZE = 32 * MIB
FORMAT = "v3"
EARLIER_FORMATS = ("v1", "v2")  # trees of earlier formats under the cache directory, removed at start
DATA_SUFFIX = ".data"
INDEX_SUFFIX = ".index"

_FRAME = struct.Struct("<4sBxxxI")
_MAGIC = b"DLFS"
_BLOCK = struct.Struct("<32sQQIIII")  # digest, index, offset, length, page size, adler32, page count
_DROP = struct.Struct("<Q")
_VERIFIED = struct.Struct("<B")
_U32 = struct.Struct("<I")
_ADLER_BASE = 65521
_MAX_PAYLOAD = 1 << 20

crc32 = zlib_ng.crc32
adler32 = zlib_ng.adler32


class CorruptBlockError(ValueError):
    """Cached data or a record that is torn, truncated, damaged or belongs to another key or block."""


class RecordType(enum.IntEnum):
    FILE = 1
    BLOCK = 2
    DROP = 3
    VERIFIED = 4


@dataclass(frozen=True, slots=True)
class FileKey:
    """What identifies a file's bytes: the DID, its size and its catalogue checksum.

    ``checksum`` is ``adler32:<8 hex>`` when the catalogue has one (then the whole file is verified),
    else ``md5:<hex>``, else empty.
    """

    did: DID
    size: int
    checksum: str
    digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        material = "\0".join((FORMAT, self.did.scope, self.did.name, str(self.size), self.checksum))
        digest = hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()
        object.__setattr__(self, "digest", digest)

    @classmethod
    def of(cls, info: DIDInfo) -> FileKey:
        """The key of a file the catalogue describes; it must have a size."""
        if info.size is None:
            raise ValueError(f"{info.did}: the catalogue gives no size")
        if info.adler32:
            checksum = f"adler32:{int(info.adler32, 16):08x}"
        elif info.md5:
            checksum = f"md5:{info.md5.lower()}"
        else:
            checksum = ""
        return cls(info.did, info.size, checksum)

    @property
    def adler32(self) -> int | None:
        kind, _, value = self.checksum.partition(":")
        return int(value, 16) if kind == "adler32" else None


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """What the journal says about one cached block."""

    index: int
    length: int
    adler32: int
    page_crcs: bytes  # one little-endian uint32 per page

    def page_crc(self, page: int) -> int:
        value: int = _U32.unpack_from(self.page_crcs, 4 * page)[0]
        return value


def block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def block_length(size: int, block_size: int, index: int) -> int:
    """Bytes of the file in block ``index`` (the last block may be short)."""
    return min(block_size, size - index * block_size)


def page_count(length: int) -> int:
    return -(-length // PAGE_SIZE)


def file_stem(root: str, digest: str) -> str:
    """The path of a file's entries without their suffix: ``<root>/<digest[:2]>/<digest>``."""
    return os.path.join(root, digest[:2], digest)


class EntryRole(enum.Enum):
    DATA = DATA_SUFFIX
    INDEX = INDEX_SUFFIX
    TEMPORARY = "tmp"  # a journal being compacted


_PREFIX_NAME = re.compile(r"[0-9a-f]{2}")
_ENTRY_NAME = re.compile(r"([0-9a-f]{64})(\.data|\.index|\.index\.[0-9a-f]+\.tmp)")


def is_prefix_name(name: str) -> bool:
    """Whether ``name`` is one the cache gives a directory under its root (so it may delete it)."""
    return _PREFIX_NAME.fullmatch(name) is not None


def parse_entry_name(prefix: str, name: str) -> tuple[str, EntryRole] | None:
    """(digest, role) of a name the cache gives an entry of the ``prefix`` directory, else None."""
    match = _ENTRY_NAME.fullmatch(name)
    if match is None or not name.startswith(prefix):
        return None
    suffix = match.group(2)
    role = EntryRole(suffix) if suffix in (DATA_SUFFIX, INDEX_SUFFIX) else EntryRole.TEMPORARY
    return match.group(1), role


def make_private_dirs(root: str, directory: str) -> None:
    """Create ``directory`` and the missing levels between it and ``root``, each 0700."""
    try:
        os.mkdir(directory, 0o700)  # its parent is there, but for a cache's first files
        return
    except FileExistsError:
        return
    except FileNotFoundError:
        pass
    missing = []
    path = directory
    while path != root and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write ``views`` one after the other from ``offset`` (``pwritev``, again for what a short write
    left)."""
    views = list(views)
    while views:
        written = os.pwritev(fd, views, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "short write")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view = view[written:]
        offset += written


#: filesystems on a local disk, where an O_DIRECT write is a DMA from the buffer; elsewhere (NFS, a
#: cluster filesystem, FUSE) it can be one synchronous network round trip per block
DIRECT_WRITE_FILESYSTEMS = frozenset({"ext4", "xfs", "btrfs"})


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the filesystem ``path`` lies on (its deepest mount point), None if unknown."""
    target = os.path.realpath(path)
    best, best_type = "", None
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                fields = line.split()
                try:
                    separator = fields.index("-")
                    mount_point = fields[4].encode().decode("unicode_escape")  # \040 for a space
                    fs_type = fields[separator + 1]
                except (ValueError, IndexError, UnicodeDecodeError):
                    continue
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, fs_type
    except OSError:
        return None
    return best_type


# ---- journal records ---------------------------------------------------------------------------


def _frame(kind: RecordType, payload: bytes) -> bytes:
    head = _FRAME.pack(_MAGIC, kind, len(payload)) + payload
    return head + _U32.pack(crc32(head))


def file_record(key: FileKey, block_size: int) -> bytes:
    meta = {
        "format": FORMAT,
        "scope": key.did.scope,
        "name": key.did.name,
        "size": key.size,
        "checksum": key.checksum,
        "block_size": block_size,
    }
    return _frame(RecordType.FILE, json.dumps(meta).encode("utf-8", "surrogateescape"))


def block_record(key: FileKey, block_size: int, record: BlockRecord) -> bytes:
    npages = page_count(record.length)
    if len(record.page_crcs) != 4 * npages:
        raise ValueError("page checksum table does not match the block length")
    fixed = _BLOCK.pack(
        bytes.fromhex(key.digest),
        record.index,
        record.index * block_size,
        record.length,
        PAGE_SIZE,
        record.adler32,
        npages,
    )
    return _frame(RecordType.BLOCK, fixed + record.page_crcs)


def block_record_size(record: BlockRecord) -> int:
    """Bytes :func:`block_record` takes for ``record``."""
    return _FRAME.size + _BLOCK.size + len(record.page_crcs) + 4


def drop_record(index: int) -> bytes:
    return _frame(RecordType.DROP, _DROP.pack(index))


def verified_record(verified: bool) -> bytes:
    return _frame(RecordType.VERIFIED, _VERIFIED.pack(verified))


_TAIL = struct.Struct("<I4s")
_TAIL_MAGIC = b"DLFT"
TAIL_SIZE = _TAIL.size


def with_tail(journal: bytes) -> bytes:
    """A one-block file's journal as it follows the file's bytes: with the tail that gives its length."""
    return journal + _TAIL.pack(len(journal), _TAIL_MAGIC)


def journal_length(tail: bytes) -> int | None:
    """The length of the journal a one-block file's tail (its last :data:`TAIL_SIZE` bytes) closes, or
    None if they are no tail."""
    if len(tail) != TAIL_SIZE:
        return None
    length, magic = _TAIL.unpack(tail)
    return length if magic == _TAIL_MAGIC and length <= _MAX_PAYLOAD else None


def read_records(raw: bytes) -> Iterator[tuple[RecordType, bytes, int]]:
    """(type, payload, end offset) of each intact record, stopping at the first damaged one."""
    pos = 0
    while pos + _FRAME.size + 4 <= len(raw):
        magic, kind, length = _FRAME.unpack_from(raw, pos)
        end = pos + _FRAME.size + length
        if magic != _MAGIC or length > _MAX_PAYLOAD or end + 4 > len(raw):
            return
        if _U32.unpack_from(raw, end)[0] != crc32(memoryview(raw)[pos:end]):
            return
        try:
            record_type = RecordType(kind)
        except ValueError:
            return
        yield record_type, raw[pos + _FRAME.size : end], end + 4
        pos = end + 4


def parse_file_record(payload: bytes, block_size: int) -> FileKey:
    """The key a journal belongs to; CorruptBlockError if it is not for this cache's block size."""
    try:
        meta = json.loads(payload.decode("utf-8", "surrogateescape"))
        key = FileKey(DID(meta["scope"], meta["name"]), int(meta["size"]), str(meta["checksum"]))
        good = meta["format"] == FORMAT and meta["block_size"] == block_size
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptBlockError(f"bad file record: {exc}") from None
    if not good:
        raise CorruptBlockError("file record of another format or block size")
    return key


def parse_block_record(payload: bytes, key: FileKey, block_size: int) -> BlockRecord:
    """Check a BLOCK record against the key and the block geometry; raise CorruptBlockError."""
    if len(payload) < _BLOCK.size:
        raise CorruptBlockError("block record truncated")
    digest, index, offset, length, page_size, adler, npages = _BLOCK.unpack_from(payload)
    if digest != bytes.fromhex(key.digest) or offset != index * block_size:
        raise CorruptBlockError("block record of another file or block")
    n_blocks = block_count(key.size, block_size)
    if index >= n_blocks or length != block_length(key.size, block_size, index):
        raise CorruptBlockError(f"block record {index} with length {length}")
    if page_size != PAGE_SIZE or npages != page_count(length) or len(payload) != _BLOCK.size + 4 * npages:
        raise CorruptBlockError("block record with a bad page table")
    return BlockRecord(index, length, adler, bytes(payload[_BLOCK.size :]))


def parse_drop_record(payload: bytes) -> int:
    value: int = _DROP.unpack(payload)[0]
    return value


def parse_verified_record(payload: bytes) -> bool:
    return bool(_VERIFIED.unpack(payload)[0])


# ---- checksums and holes -----------------------------------------------------------------------


def adler32_combine(adler1: int, adler2: int, length2: int) -> int:
    """adler32 of ``A + B`` from adler32(A), adler32(B) and len(B) (zlib's ``adler32_combine``)."""
    rem = length2 % _ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % _ADLER_BASE
    sum1 += (adler2 & 0xFFFF) + _ADLER_BASE - 1
    sum2 += ((adler1 >> 16) & 0xFFFF) + ((adler2 >> 16) & 0xFFFF) + _ADLER_BASE - rem
    if sum1 >= _ADLER_BASE:
        sum1 -= _ADLER_BASE
    if sum1 >= _ADLER_BASE:
        sum1 -= _ADLER_BASE
    if sum2 >= _ADLER_BASE << 1:
        sum2 -= _ADLER_BASE << 1
    if sum2 >= _ADLER_BASE:
        sum2 -= _ADLER_BASE
    return sum1 | (sum2 << 16)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give the disk space of ``[offset, offset+length)`` back (Linux ``FALLOC_FL_PUNCH_HOLE``).

    Returns False where the file system cannot; then the bytes stay allocated.
    """
    if _fallocate is None or length <= 0:
        return False
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code))
