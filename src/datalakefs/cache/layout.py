"""Cache keys, paths and the block file format.

Layout under the cache directory (``<cache_dir>/v1/``, all directories 0700, all files 0600)::

    v1/<d[:2]>/<d>/meta               JSON: scope, name, size, checksum, block_size, verified
    v1/<d[:2]>/<d>/0000000042.blk     block 42 of the file: 4 KiB header, then the block's bytes
    v1/<d[:2]>/<d>/.0000000042.<random>.tmp    a block being written (dropped at start)

``d`` is the SHA-256 of the :class:`FileKey` (DID, size, checksum): paths never contain a DID name, and
DIDs are immutable, so a key never refers to different bytes. Block ``i`` holds file bytes
``[i*block_size, min(size, (i+1)*block_size))``.

Block header (little-endian, padded to :data:`HEADER_SIZE` so the data is page aligned): magic, the
key's digest, block index, file offset, data length, page size, adler32 of the data, page count, a CRC32
per :data:`PAGE_SIZE` page of the data, and a CRC32 of all of the preceding header bytes. A block is
served only after its header matches the key, index, offset and length it must have, the file has
exactly ``HEADER_SIZE + length`` bytes, and each page read has its CRC32. Per-page CRCs let a small read
check only the pages it touches.

Checksums come from zlib-ng (same algorithms as zlib): measured here, CRC32 runs at ~40 µs/MiB and
adler32 at ~20-35 µs/MiB against ~300-350 µs/MiB with the standard library. The whole file's adler32 is
folded from the per-block adler32s with :func:`adler32_combine`, so checking a complete file against the
catalogue never re-reads it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
from dataclasses import dataclass, field

from zlib_ng import zlib_ng

from datalakefs.model import DID, DIDInfo

HEADER_SIZE = 4096
PAGE_SIZE = 64 << 10
MIB = 1 << 20
MAX_BLOCK_SIZE = 32 * MIB
FORMAT = "v1"
META_NAME = "meta"

_MAGIC = b"DLFSBLK1"
_FIXED = struct.Struct("<8s32sQQIIII")
_U32 = struct.Struct("<I")
_ADLER_BASE = 65521

crc32 = zlib_ng.crc32
adler32 = zlib_ng.adler32


class CorruptBlockError(ValueError):
    """A block file is torn, truncated, damaged or belongs to another key or index."""


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


def block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def block_length(size: int, block_size: int, index: int) -> int:
    """Bytes of the file in block ``index`` (the last block may be short)."""
    return min(block_size, size - index * block_size)


def page_count(length: int) -> int:
    return -(-length // PAGE_SIZE)


def file_directory(root: str, digest: str) -> str:
    return os.path.join(root, digest[:2], digest)


def block_name(index: int) -> str:
    return f"{index:010d}.blk"


def parse_block_name(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    if dot and ext == "blk" and len(stem) == 10 and stem.isdigit():
        return int(stem)
    return None


def make_private_dirs(root: str, directory: str) -> None:
    """Create ``directory`` and the missing levels between it and ``root``, each 0700."""
    missing = []
    path = directory
    while path != root and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view = view[written:]
        offset += written


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """What a block's header says about its data; trusted only after :func:`parse_header`."""

    index: int
    length: int
    adler32: int
    page_crcs: bytes  # one little-endian uint32 per page

    def page_crc(self, page: int) -> int:
        value: int = _U32.unpack_from(self.page_crcs, 4 * page)[0]
        return value


def pack_header(key: FileKey, block_size: int, header: BlockHeader) -> bytes:
    npages = page_count(header.length)
    if len(header.page_crcs) != 4 * npages:
        raise ValueError("page checksum table does not match the block length")
    fixed = _FIXED.pack(
        _MAGIC,
        bytes.fromhex(key.digest),
        header.index,
        header.index * block_size,
        header.length,
        PAGE_SIZE,
        header.adler32,
        npages,
    )
    body = fixed + header.page_crcs
    return (body + _U32.pack(crc32(body))).ljust(HEADER_SIZE, b"\0")


def parse_header(raw: bytes, key: FileKey, block_size: int, index: int) -> BlockHeader:
    """Check that ``raw`` is a valid header of block ``index`` of ``key``; raise CorruptBlockError."""
    if len(raw) < _FIXED.size + 4:
        raise CorruptBlockError("header truncated")
    magic, digest, got_index, offset, length, page_size, adler, npages = _FIXED.unpack_from(raw)
    end = _FIXED.size + 4 * npages
    if magic != _MAGIC or end + 4 > HEADER_SIZE or len(raw) < end + 4:
        raise CorruptBlockError("not a block header")
    if _U32.unpack_from(raw, end)[0] != crc32(memoryview(raw)[:end]):
        raise CorruptBlockError("header checksum mismatch")
    expected = block_length(key.size, block_size, index)
    if digest != bytes.fromhex(key.digest) or got_index != index or offset != index * block_size:
        raise CorruptBlockError("header belongs to another file or block")
    if length != expected or page_size != PAGE_SIZE or npages != page_count(length):
        raise CorruptBlockError(f"header length {length}, expected {expected}")
    return BlockHeader(index, length, adler, bytes(raw[_FIXED.size : end]))


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
