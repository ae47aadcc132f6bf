"""Uploads to a Rucio RSE over WebDAV, without rucio's ``UploadClient``.

``UploadClient`` registers a replica in COPYING before the transfer and skips the final state update
when a re-run finds the file already on the RSE; and a WebDAV 409 (a missing parent collection) is
reported as ``FileReplicaAlreadyExists``. Neither is safe to resume after a crash, so the steps are
done here, in an order where a kill at any instant leaves the lake correct:

1. :meth:`~RucioUploader.locate`, for a batch of files: ``get_metadata_bulk``. A DID that exists
   with the same size and adler32 was stored and registered by an earlier run (or by someone else:
   identical content), so it skips to step 4; with other content it is an
   :class:`UploadConflictError`, never an overwrite. The others get their PFN from the RSE's
   deterministic ``lfns2pfns`` (operation ``write``).
2. :meth:`~RucioUploader.store`, one file: ``PUT`` the spool file to the PFN, computing adler32 of
   the bytes as they are sent. No replica is registered yet, so an object already at the PFN is what
   an interrupted earlier attempt left there: it is deleted first, unless the DID was registered
   meanwhile (by another client: same content skips the PUT, other content is an
   :class:`UploadConflictError`). The PUT itself is conditional (``If-None-Match: *``), so a server
   that honours that never lets it overwrite what someone else stored in between. Then ``HEAD`` the
   PFN: the stored size must match (and the adler32, when the server sends a ``Digest``).
3. :meth:`~RucioUploader.register`, for a batch: only now ``add_replicas`` with state AVAILABLE,
   which creates the file DIDs and their replicas in one call. So no replica is ever COPYING, and
   none is registered without its bytes.
4. Attach the files to their ``scope:dataset`` (duplicates ignored). The replica is kept from the
   reaper by a rule on the upload RSE, and ``upload_rule_rse`` asks for a second copy. As Rucio's own
   upload does, a dataset created here carries those rules itself (``add_dataset`` with ``rules``,
   grouping DATASET, in one transaction), and every attached file is covered by them: no rule per
   file, which costs the server ~7 ms a file. A dataset that existed before is asked for its rules
   once; files attached to one without a rule on an expression get a rule of their own, as a batch.
   Each step tolerates "already done".

A batch call the server refuses as a whole (Rucio runs each in one transaction) is made again file
by file, so that each file gets its own answer; unless the server is unreachable or refuses our
credentials, which every file would meet alike.

Blocking: call from worker threads. One rucio client per call, borrowed from the catalogue's pool.
The storage requests (PUT, HEAD, DELETE) go through the mount's one storage transport
(:class:`~datalakefs.transport.storage.StorageClient`: its credentials, CA policy and deadlines);
this module makes only catalogue calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import requests
from rucio.common import exception as rucio_exc
from zlib_ng import zlib_ng

from datalakefs.catalogue.rucio import RucioCatalogue
from datalakefs.catalogue.upload import (
    ObjectStore,
    Registration,
    SpoolChangedError,
    TransitionHooks,
    UploadConflictError,
    UploadJob,
)
from datalakefs.config import Config
from datalakefs.errors import AccessDeniedError, DatalakeError, InvalidNameError, StorageConflictError, TransferError

log = logging.getLogger(__name__)

#: Rucio's generic schema for DID names (rucio.common.schema.generic NAME; the client package cannot
#: import that module without the server's database layer).
_NAME: Final = re.compile(r"^[/A-Za-z0-9][/A-Za-z0-9.\-_]*$")
_NAME_LENGTH: Final = 250
#: bytes per read of the PUT body (http.client asks for 8 KiB; larger reads cost fewer Python calls)
_PUT_CHUNK: Final = 1 << 20
#: LFNs per ``lfns2pfns`` call: they travel in the URL
_LFNS_PER_CALL: Final = 50
_WEBDAV_SCHEMES: Final = ("https", "davs", "http", "dav")
_ALREADY: Final = (rucio_exc.FileReplicaAlreadyExists, rucio_exc.DataIdentifierAlreadyExists, rucio_exc.Duplicate)
#: failures of a batch call that every file of it would meet alike: no point asking file by file
_SHARED_CAUSES: Final = (requests.ConnectionError, requests.Timeout, rucio_exc.ServerConnectionException)


class RucioUploader:
    """:class:`~datalakefs.catalogue.upload.Uploader` for ``upload_rse`` (see the module doc)."""

    def __init__(
        self, catalogue: RucioCatalogue, config: Config, storage: ObjectStore, hooks: TransitionHooks | None = None
    ) -> None:
        self._catalogue = catalogue
        self._hooks = hooks or TransitionHooks()
        self._rse = config.upload_rse
        self._rule_rse = config.upload_rule_rse
        self._storage = storage
        # per dataset this uploader created or found, the rule expressions it carries: one
        # add_dataset (or list_did_rules) call per dataset, not per file
        self._datasets: dict[tuple[str, str], frozenset[str]] = {}
        self._scheme: str | None = None  # the RSE's WebDAV scheme for writing, once found

    def check_name(self, name: str) -> None:
        check_did_name(name)

    # -- the steps (see the module doc) -------------------------------------------------------------

    def locate(self, jobs: Sequence[UploadJob]) -> list[str | Exception | None]:
        rse = self._upload_rse()
        registered = self._registered(jobs)
        pfns = self._pfns(rse, [job for job in jobs if _key(job) not in registered])
        return [_conflict(job, registered[_key(job)]) if _key(job) in registered else pfns[_lfn(job)]
                for job in jobs]

    def store(self, job: UploadJob, url: str) -> None:
        if self._make_room(url, job):
            self._put(job, url)
        self._verify_stored(url, job.size, job.adler32)

    def store_stream(self, url: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        """The PUT goes out with chunked transfer encoding; nothing is registered (``locate`` found
        no DID), so an abandoned one leaves at most a partial object at the PFN, which the next
        attempt deletes before its own PUT."""
        self._make_room(url, None)
        body = Adler32Chunks(chunks)
        self._put_checked(url, iter(body), None)
        self._verify_stored(url, body.sent, body.adler32)
        return body.sent, body.adler32

    def register(self, registrations: Sequence[Registration]) -> list[Exception | None]:
        self._upload_rse()
        errors: dict[UploadJob, Exception] = {}
        stored = [r.job for r in registrations if r.stored]
        if stored:
            errors.update(self._by_batch_or_each(stored, self._add_replicas))
            self._hooks.reached("upload-registered")
        errors.update(self._by_batch_or_each([r.job for r in registrations if r.job not in errors], self._attach))
        self._hooks.reached("upload-attached")
        return [errors.get(r.job) for r in registrations]

    # -- catalogue calls --------------------------------------------------------------------------

    def _upload_rse(self) -> str:
        if self._rse is None:
            raise TransferError("no upload_rse is configured: outbox files wait until one is")
        return self._rse

    def _registered(self, jobs: Sequence[UploadJob]) -> dict[tuple[str, str], Mapping[str, Any]]:
        """The catalogue metadata of those of ``jobs`` whose DID exists."""
        with self._catalogue.borrow() as client:
            try:
                rows = list(client.get_metadata_bulk([{"scope": job.scope, "name": job.name} for job in jobs]))
            except rucio_exc.DataIdentifierNotFound:
                rows = []
        return {(str(row["scope"]), str(row["name"])): row for row in rows}

    def _pfns(self, rse: str, jobs: Sequence[UploadJob]) -> dict[str, str]:
        found: dict[str, str] = {}
        lfns = [_lfn(job) for job in jobs]
        with self._catalogue.borrow() as client:
            for start in range(0, len(lfns), _LFNS_PER_CALL):
                found.update(self._write_pfns(client, rse, lfns[start : start + _LFNS_PER_CALL]))
        return found

    def _write_pfns(self, client: Any, rse: str, lfns: list[str]) -> dict[str, str]:
        for scheme in sorted(_WEBDAV_SCHEMES, key=lambda known: known != self._scheme):
            try:
                pfns = client.lfns2pfns(rse, lfns, operation="write", scheme=scheme)
            except (rucio_exc.RSEProtocolNotSupported, rucio_exc.RSEOperationNotSupported):
                continue
            self._scheme = scheme
            return {lfn: str(pfns[lfn]) for lfn in lfns}
        raise TransferError(f"RSE {rse} has no WebDAV protocol for writing")

    def _add_replicas(self, jobs: Sequence[UploadJob]) -> None:
        replicas = [{"scope": job.scope, "name": job.name, "bytes": job.size, "adler32": job.adler32, "state": "A"}
                    for job in jobs]
        with self._catalogue.borrow() as client:
            try:
                client.add_replicas(self._rse, replicas)
            except _ALREADY:
                if len(jobs) > 1:
                    raise  # the whole batch was rolled back: it is asked again file by file
                # registered concurrently, or the answer to our own earlier call was lost: same
                # content is fine
                conflict = _conflict(jobs[0], client.get_metadata(jobs[0].scope, jobs[0].name))
                if conflict is not None:
                    raise conflict from None

    def _attach(self, jobs: Sequence[UploadJob]) -> None:
        by_dataset: dict[tuple[str, str], list[dict[str, str]]] = {}
        for job in jobs:
            by_dataset.setdefault((job.scope, job.dataset), []).append({"scope": job.scope, "name": job.name})
        with self._catalogue.borrow() as client:
            for scope, dataset in by_dataset.keys() - self._datasets.keys():
                self._datasets[(scope, dataset)] = self._dataset_rules(client, scope, dataset)
            attachments = [{"scope": scope, "name": dataset, "dids": dids}
                           for (scope, dataset), dids in by_dataset.items()]
            try:
                client.attach_dids_to_dids(attachments, ignore_duplicate=True)
            except rucio_exc.DataIdentifierNotFound:
                for key in by_dataset:  # deleted meanwhile: created again on the retry
                    self._datasets.pop(key, None)
                raise
            for rse in self._rule_expressions():
                uncovered = [did for key, dids in by_dataset.items() if rse not in self._datasets[key] for did in dids]
                if uncovered:
                    _add_file_rules(client, uncovered, rse)

    def _rule_expressions(self) -> list[str]:
        """The upload RSE, and ``upload_rule_rse`` when it is another."""
        return list(dict.fromkeys(r for r in (self._rse, self._rule_rse) if r))

    def _dataset_rules(self, client: Any, scope: str, dataset: str) -> frozenset[str]:
        """Create ``scope:dataset`` with our rules, or find the rule expressions it already has
        (rules with a lifetime do not count: they end)."""
        rules = [{"account": client.account, "copies": 1, "rse_expression": rse, "grouping": "DATASET"}
                 for rse in self._rule_expressions()]
        try:
            client.add_dataset(scope, dataset, rules=rules)
            return frozenset(rule["rse_expression"] for rule in rules)
        except rucio_exc.DataIdentifierAlreadyExists:
            return frozenset(str(rule["rse_expression"]) for rule in client.list_did_rules(scope, dataset)
                             if rule.get("expires_at") is None)

    @staticmethod
    def _by_batch_or_each(
        jobs: Sequence[UploadJob], call: Callable[[Sequence[UploadJob]], None]
    ) -> dict[UploadJob, Exception]:
        """``call`` over all ``jobs`` at once; if the server refuses that, over each job alone, so
        that every job gets its own error (see the module doc)."""
        try:
            call(jobs)
            return {}
        except DatalakeError as exc:
            if len(jobs) == 1 or isinstance(exc, AccessDeniedError) or isinstance(exc.__cause__, _SHARED_CAUSES):
                return dict.fromkeys(jobs, exc)
        errors: dict[UploadJob, Exception] = {}
        for job in jobs:
            try:
                call([job])
            except DatalakeError as exc:
                errors[job] = exc
        return errors

    # -- storage calls, through the storage transport -------------------------------------------------

    def _make_room(self, url: str, job: UploadJob | None) -> bool:
        """Whether ``job``'s bytes must still be PUT to ``url``: an object already there is deleted when
        it is an unregistered leftover; a DID registered meanwhile is a conflict, or, with the same
        content, means the bytes are there."""
        if self._storage.head(url) is None:
            return True
        if job is not None:
            with self._catalogue.borrow() as client:
                try:
                    meta = client.get_metadata(job.scope, job.name)
                except rucio_exc.DataIdentifierNotFound:
                    meta = None
            if meta is not None:
                conflict = _conflict(job, meta)
                if conflict is not None:
                    raise conflict
                return False
        log.info("event=upload-leftover-deleted url=%s", _where(url))
        self._storage.delete(url)
        return True

    def _put(self, job: UploadJob, pfn: str) -> None:
        bodies: list[_Adler32Count] = []

        def body() -> Iterator[bytes]:  # called again when the PUT is repeated with renewed credentials
            counted = _Adler32Count()
            bodies.append(counted)
            left = job.size
            with open(job.path, "rb", buffering=0) as fh:
                while left > 0 and (chunk := fh.read(min(_PUT_CHUNK, left))):
                    left -= len(chunk)
                    yield counted.count(chunk)
                    # sent (the transfer asks for the next chunk only then): the spool file is not read
                    # again, so its pages may go (outbox/spool.py says why that matters)
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fh.fileno(), job.size - left - len(chunk), len(chunk),
                                         os.POSIX_FADV_DONTNEED)

        self._put_checked(pfn, body, job.size)
        sent = bodies[-1]
        if sent.sent != job.size or sent.adler32 != job.adler32:
            raise SpoolChangedError(
                f"the spool file of {job.scope}:{job.name} changed under the upload "
                f"({sent.sent} bytes, adler32 {sent.adler32}; journal {job.size}, {job.adler32})"
            )

    def _put_checked(self, pfn: str, body: Callable[[], Iterable[bytes]] | Iterable[bytes], size: int | None) -> None:
        try:
            self._storage.put(pfn, body, size)
        except StorageConflictError as exc:
            raise UploadConflictError(str(exc)) from None

    def _verify_stored(self, pfn: str, size: int, adler32: str) -> None:
        stored = self._storage.head(pfn)
        if stored is None:
            raise TransferError(f"{_where(pfn)} is missing after the PUT")
        stored_size, stored_adler32 = stored
        if stored_size != size:
            raise TransferError(f"{_where(pfn)} holds {stored_size} bytes after the PUT, not {size}")
        if stored_adler32 is not None and stored_adler32 != adler32:
            raise TransferError(f"{_where(pfn)} has adler32 {stored_adler32} after the PUT, not {adler32}")


def _add_file_rules(client: Any, files: list[dict[str, str]], rse: str) -> None:
    """One rule per file on ``rse``; files that have theirs already (an earlier run) keep it."""
    try:
        client.add_replication_rule(files, 1, rse)
    except rucio_exc.DuplicateRule:
        # some file already has its rule: the batch was rolled back
        for did in files:
            with contextlib.suppress(rucio_exc.DuplicateRule):
                client.add_replication_rule([did], 1, rse)


def _key(job: UploadJob) -> tuple[str, str]:
    return job.scope, job.name


def _lfn(job: UploadJob) -> str:
    return f"{job.scope}:{job.name}"


def _conflict(job: UploadJob, meta: Mapping[str, Any]) -> UploadConflictError | None:
    """None when the registered DID ``meta`` is ``job``'s file with the same content."""
    size = meta.get("bytes")
    adler32 = meta.get("adler32")
    if str(meta.get("did_type", "")).rsplit(".", 1)[-1] == "FILE" and size == job.size and adler32 == job.adler32:
        return None
    return UploadConflictError(
        f"{job.scope}:{job.name} already exists in the catalogue with other content "
        f"(size {size}, adler32 {adler32}; ours {job.size}, {job.adler32}): not overwritten"
    )


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


class _Adler32Count:
    """The count and adler32 of the bytes handed out so far."""

    def __init__(self) -> None:
        self._adler = 1
        self.sent = 0

    def count(self, chunk: bytes) -> bytes:
        self._adler = zlib_ng.adler32(chunk, self._adler)
        self.sent += len(chunk)
        return chunk

    @property
    def adler32(self) -> str:
        return f"{self._adler & 0xFFFFFFFF:08x}"


class Adler32Chunks(_Adler32Count):
    """Chunks as a PUT body (chunked transfer encoding), counted."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return (self.count(chunk) for chunk in self._chunks)
