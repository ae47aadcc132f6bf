"""Stream mode (a package: ``reader`` holds an open file's window, ``fetch`` the single-flight
fetch of blocks and pieces through :mod:`datalakefs.transport.failover`, ``content`` the filesystem's
FileContent): reads served from the verified block cache, missing blocks fetched with range GETs.

The filesystem gets one :class:`StreamReader` per open file (through :class:`StreamContent`, or
:meth:`StreamService.open`) and calls ``await reader.read(offset, size)`` from its read handler.

**Hits** are served inline: ``os.pread`` on the cache's data file, verified by the cache, with no thread hop
and no await.

**Misses and prefetch.**

* A block is transferred at most once at a time however many readers wait for it (single flight:
  one service-wide map of pending blocks; waiters sleep on a ``trio.Event``).
* A reader is *sequential* while each read starts exactly where its reads so far end, or lies inside
  the blocks its window already requested (the kernel may deliver read-ahead requests slightly out of
  order); any other read is random, fetches exactly what it touches (one request) and starts a new
  stretch. Its read-ahead window starts at one block (at least 1 MiB) and doubles each time it
  reaches a new block, up to ``prefetch_max`` (and at most a quarter of the cache) shared by the
  readers streaming at that moment, down to an eighth of it (:meth:`StreamService.window_limit`), so
  that the blocks N parallel readers fetch ahead fit in memory together. When less than half a window is left
  ahead of the reader, the window's missing blocks are requested at once, so requests are large and
  overlap. A random read of a large span fetches exactly the blocks it touches.
* A **small random read** (less than half a block, e.g. the kernel's 4 KiB READ for a random ``pread``)
  whose blocks are neither cached nor on the way is a *piece read*: one closed-range GET of just the
  4 KiB pages it covers, answered from memory and not cached (a block cache of 1 MiB blocks would
  otherwise move 256× the bytes asked for: 2,000 random 4 KiB reads of a 1 GiB file touch 86 % of its
  blocks). Pieces are single flight too (one GET per distinct piece however many readers wait), fail
  over like blocks, and are checked like every transfer (status, Content-Range, exact body length); a
  piece has no checksum of its own in the catalogue, so it is not adler32-verified. Pieces of plain
  ``http://`` URLs are fetched on the trio thread (:mod:`datalakefs.transport.trio_http`): no thread
  hop, which on a local link costs more than the GET itself; other URLs go through aiohttp. The first
  reader of a piece fetches it in its own task (no task spawn, no wake-up: scheduler rounds that cost
  more than the GET); if it is interrupted, a reader waiting for the piece fetches it again. So is a
  transfer of a small file's blocks (at most ``INLINE_TRANSFER_MAX`` bytes, e.g. every file of a
  dataset of small files): fetched and written to the cache on the trio thread, which a whole file of
  a few KiB costs less than the two thread hops and aiohttp's per-request work. Once a reader turns
  sequential its window fetches whole blocks into the cache as above. ``piece_reads = false`` turns
  pieces off: every read then fetches, caches and verifies whole blocks.
* Missing consecutive blocks are fetched with one closed-range GET per ``max_request`` bytes (64 MiB:
  measured here against a local XrdHttp, one GET per stretch beat 16 MiB pieces, 918 vs 764 MB/s and
  1.29 vs 1.45 CPU s/GiB, as the transport notes predicted for aiohttp). The body
  is written to the cache's data file on the transport's thread (a long transfer's blocks on the disk
  thread, past the page cache); trio is woken (``TrioToken.run_sync_soon``) to take a block and wake
  its waiters only when a reader waits for it, so a reader needing the first block of a 32 MiB request
  does not wait for the rest; the other blocks are taken when trio next looks (a reader missing a
  block, a transfer returning: ``LandingHandoff``). A block written past the page cache reaches its
  readers as soon as it arrived, from the buffer it was received into, before its write; it is
  committed to the cache once its write ended (never before), and is found among the blocks being
  written meanwhile; the read of a file's last bytes waits for the file's last writes, so that the
  whole-file check below still comes with it.
* Block transfers run in the service's nursery, not in the readers' tasks: an interrupted reader does
  not cancel a transfer that others wait for.

**Replicas and failover.** Each reader has candidate URLs (XCache first; see
:mod:`datalakefs.transport.replicas`), looked up on its first miss, so opening a file costs nothing. A
failed attempt (5xx, timeout, reset, short body, wrong range reply) moves on to the next candidate at
once, resuming at the first block that has not arrived; after every candidate failed, the transfer waits
(``retry_backoff``, doubling) and tries them all again, ``Config.http_retries`` more times. Candidates
that answered 401/403/404 are not asked again by that transfer. A reader starts with the candidate that
last worked for it, or with the one after the candidate that last failed. When every attempt failed,
the waiters get ``TransferError`` (EIO) listing each attempt's reason, as the log does;
``AccessDeniedError`` (EACCES) when every candidate refused access.

**Verification.** Every block is checked by the cache on every read. Once a file's last block is in
the cache, the next read checks the whole file's adler32 against the catalogue before returning
anything; on a mismatch the file's blocks are dropped (from the cache and from memory: a retry
fetches them again) and that read raises ``TransferError``.

**Disk trouble.** A block that cannot be written to the cache (disk full, I/O error) is given to its
readers from a small in-memory buffer; on ENOSPC the cache also evicts a tenth of its blocks. Reads keep
working.
"""

from datalakefs.staging.stream.content import ReplicaSource, StreamContent
from datalakefs.staging.stream.fetch import (
    INLINE_TRANSFER_MAX,
    PIECE_ALIGN,
    PieceTransport,
    RangeTransport,
    StreamService,
    StreamStatistics,
)
from datalakefs.staging.stream.reader import StreamReader
from datalakefs.transport.failover import Locate, known_replicas

__all__ = [
    "INLINE_TRANSFER_MAX",
    "PIECE_ALIGN",
    "Locate",
    "PieceTransport",
    "RangeTransport",
    "ReplicaSource",
    "StreamContent",
    "StreamReader",
    "StreamService",
    "StreamStatistics",
    "known_replicas",
]
