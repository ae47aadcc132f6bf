"""Uploads to a Rucio RSE over WebDAV, without rucio's ``UploadClient``.

``UploadClient`` registers a replica in COPYING before the transfer and skips the final state update
when a re-run finds the file already on the RSE; and a WebDAV 409 (a missing parent collection) is
reported as ``FileReplicaAlreadyExists``. Neither is safe to resume after a crash, so the steps are
done here, in an order where a kill at any instant leaves the lake correct:

1. ``get_metadata(scope, name)``: the DID exists with the same size and adler32 → the bytes were
   stored and registered by an earlier run (or by someone else: identical content), skip to step 5;
   with other content → :class:`UploadConflictError`, never an overwrite.
2. The PFN from the RSE's deterministic ``lfns2pfns`` (operation ``write``).
3. ``PUT`` the spool file to the PFN, computing adler32 of the bytes as they are sent. No replica is
   registered yet, so whatever an interrupted earlier attempt left at the PFN is overwritten.
4. ``HEAD`` the PFN: the stored size must match (and the adler32, when the server sends a
   ``Digest``). Only then ``add_replicas`` with state AVAILABLE, which creates the file DID and its
   replica in one call. So no replica is ever COPYING, and none is registered without its bytes.
5. Create ``scope:dataset`` when missing, attach the file, add a rule on the upload RSE (it keeps the
   replica from the reaper) and the optional extra rule. Each tolerates "already done".

Blocking: call from worker threads. One rucio client per call, borrowed from the catalogue's pool.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import BinaryIO, Final

import requests
from rucio.common import exception as rucio_exc
from zlib_ng import zlib_ng

from datalakefs.catalogue.rucio import RucioCatalogue
from datalakefs.catalogue.upload import SpoolChangedError, StepHook, UploadConflictError, UploadJob
from datalakefs.config import Config
from datalakefs.errors import InvalidNameError, TransferError

log = logging.getLogger(__name__)

#: Rucio's generic schema for DID names (rucio.common.schema.generic NAME; the client package cannot
#: import that module without the server's database layer).
_NAME: Final = re.compile(r"^[/A-Za-z0-9][/A-Za-z0-9.\-_]*$")
_NAME_LENGTH: Final = 250
#: bytes per read of the PUT body (http.client asks for 8 KiB; larger reads cost fewer Python calls)
_PUT_CHUNK: Final = 1 << 20
_WEBDAV_SCHEMES: Final = ("https", "davs", "http", "dav")
_ALREADY: Final = (rucio_exc.FileReplicaAlreadyExists, rucio_exc.DataIdentifierAlreadyExists, rucio_exc.Duplicate)
_ATTACHED: Final = (rucio_exc.FileAlreadyExists, rucio_exc.DuplicateContent, rucio_exc.Duplicate)


class RucioUploader:
    """:class:`~datalakefs.catalogue.upload.Uploader` for ``upload_rse`` (see the module doc)."""

    def __init__(self, catalogue: RucioCatalogue, config: Config) -> None:
        self._catalogue = catalogue
        self._rse = config.upload_rse
        self._rule_rse = config.upload_rule_rse
        self._verify: bool | str = config.storage_ca_bundle or True
        self._timeout = config.http_timeout
        # datasets this uploader created or found: one add_dataset call per dataset, not per file
        self._datasets: set[tuple[str, str]] = set()

    def check_name(self, name: str) -> None:
        check_did_name(name)

    def upload(self, job: UploadJob, step: StepHook) -> bool:
        if self._rse is None:
            raise TransferError("no upload_rse is configured: outbox files wait until one is")
        stored = False
        if not self._already_registered(job):
            pfn = self._pfn(job)
            self._put(job, pfn)
            self._verify_stored(job, pfn)
            step("stored")
            stored = self._register(job)
            step("registered")
        self._attach(job)
        step("attached")
        return stored

    # -- steps ------------------------------------------------------------------------------------

    def _already_registered(self, job: UploadJob) -> bool:
        with self._catalogue.borrow() as client:
            try:
                meta = client.get_metadata(job.scope, job.name)
            except rucio_exc.DataIdentifierNotFound:
                return False
        size = meta.get("bytes")
        adler32 = meta.get("adler32")
        if str(meta.get("did_type", "")).rsplit(".", 1)[-1] != "FILE" or size != job.size or adler32 != job.adler32:
            raise UploadConflictError(
                f"{job.scope}:{job.name} already exists in the catalogue with other content "
                f"(size {size}, adler32 {adler32}; ours {job.size}, {job.adler32}): not overwritten"
            )
        return True

    def _pfn(self, job: UploadJob) -> str:
        lfn = f"{job.scope}:{job.name}"
        with self._catalogue.borrow() as client:
            for scheme in _WEBDAV_SCHEMES:
                try:
                    pfns = client.lfns2pfns(self._rse, [lfn], operation="write", scheme=scheme)
                except (rucio_exc.RSEProtocolNotSupported, rucio_exc.RSEOperationNotSupported):
                    continue
                return str(pfns[lfn])
        raise TransferError(f"RSE {self._rse} has no WebDAV protocol for writing")

    def _put(self, job: UploadJob, pfn: str) -> None:
        with open(job.path, "rb", buffering=0) as fh:
            body = Adler32Reader(fh, job.size)
            try:
                answer = requests.put(pfn, data=body, verify=self._verify, timeout=self._timeout,
                                      headers={"Content-Length": str(job.size)})
            except requests.RequestException as exc:
                raise TransferError(f"PUT {_where(pfn)} failed: {exc}") from exc
        if answer.status_code not in (200, 201, 204):
            raise TransferError(f"PUT {_where(pfn)}: HTTP {answer.status_code} {answer.reason}")
        if body.sent != job.size or body.adler32 != job.adler32:
            raise SpoolChangedError(
                f"the spool file of {job.scope}:{job.name} changed under the upload "
                f"({body.sent} bytes, adler32 {body.adler32}; journal {job.size}, {job.adler32})"
            )

    def _verify_stored(self, job: UploadJob, pfn: str) -> None:
        try:
            answer = requests.head(pfn, verify=self._verify, timeout=self._timeout,
                                   headers={"Want-Digest": "adler32"})
        except requests.RequestException as exc:
            raise TransferError(f"HEAD {_where(pfn)} failed: {exc}") from exc
        if answer.status_code != 200:
            raise TransferError(f"HEAD {_where(pfn)} after the PUT: HTTP {answer.status_code}")
        size = int(answer.headers.get("Content-Length", -1))
        if size != job.size:
            raise TransferError(f"{_where(pfn)} holds {size} bytes after the PUT, not {job.size}")
        digest = _adler32_digest(answer.headers.get("Digest", ""))
        if digest is not None and digest != job.adler32:
            raise TransferError(f"{_where(pfn)} has adler32 {digest} after the PUT, not {job.adler32}")

    def _register(self, job: UploadJob) -> bool:
        replica = {"scope": job.scope, "name": job.name, "bytes": job.size, "adler32": job.adler32, "state": "A"}
        with self._catalogue.borrow() as client:
            try:
                client.add_replicas(self._rse, [replica])
            except _ALREADY:
                # registered concurrently (or the answer to our own call was lost): same content is fine
                return not self._already_registered(job)
        return True

    def _attach(self, job: UploadJob) -> None:
        file_did = [{"scope": job.scope, "name": job.name}]
        dataset = (job.scope, job.dataset)
        with self._catalogue.borrow() as client:
            if dataset not in self._datasets:
                with contextlib.suppress(rucio_exc.DataIdentifierAlreadyExists):
                    client.add_dataset(job.scope, job.dataset)
                self._datasets.add(dataset)
            try:
                client.attach_dids(job.scope, job.dataset, file_did)
            except _ATTACHED:
                pass
            except rucio_exc.DataIdentifierNotFound:
                self._datasets.discard(dataset)  # deleted meanwhile: created again on the retry
                raise
            for rse in dict.fromkeys(r for r in (self._rse, self._rule_rse) if r):
                with contextlib.suppress(rucio_exc.DuplicateRule):
                    client.add_replication_rule(file_did, 1, rse)


def check_did_name(name: str) -> None:
    """``InvalidNameError`` unless Rucio's generic schema accepts ``name`` as a DID name."""
    if len(name) > _NAME_LENGTH or not _NAME.match(name):
        raise InvalidNameError(
            f"{name!r} is not a valid Rucio DID name (letters, digits, '.', '-', '_', at most "
            f"{_NAME_LENGTH} characters, starting with a letter or digit)"
        )


def _where(pfn: str) -> str:
    """The PFN without any query string (a signed URL's query may hold a credential)."""
    return pfn.split("?", 1)[0]


def _adler32_digest(header: str) -> str | None:
    for part in header.split(","):
        algorithm, _, value = part.strip().partition("=")
        if algorithm.lower() == "adler32" and value:
            return value.lower().zfill(8)
    return None


class Adler32Reader:
    """A file as a PUT body: ``read`` hands out the bytes and keeps their adler32 and count."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self._size = size
        self._adler = 1
        self.sent = 0

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(max(size, _PUT_CHUNK))
        self._adler = zlib_ng.adler32(chunk, self._adler)
        self.sent += len(chunk)
        return chunk

    @property
    def adler32(self) -> str:
        return f"{self._adler & 0xFFFFFFFF:08x}"
