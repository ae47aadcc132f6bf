"""The catalogue protocol, in datalakefs' own types.

Implementations block (rucio-clients uses ``requests``): they are called from worker threads only.
Errors are translated at this boundary: an unknown DID raises ``NotFoundError``, refused credentials
``AccessDeniedError``, a server that cannot be reached or fails ``CatalogueUnavailableError``.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Protocol, TypeAlias

from datalakefs.model import DID, DIDInfo, FileReplicas, Lock, RSEReplica, Rule

#: a listing's rows in batches as the answer arrives (a generator: closing it ends the request)
Batches: TypeAlias = Generator[list[DIDInfo], None, None]


class Catalogue(Protocol):
    def list_scopes(self) -> list[str]:
        """Every scope, sorted."""
        ...

    def list_collections(self, scope: str) -> list[DIDInfo]:
        """The datasets and containers of ``scope``; ``NotFoundError`` when there is no such scope."""
        ...

    def list_content(self, did: DID) -> Batches:
        """The direct children of a collection, with size and checksums for files, in batches as the
        answer arrives (each batch non-empty; the whole answer is every batch in order). Errors are
        raised where they happen: before the first batch, or after some. A caller that stops early
        closes the iterator, which ends the request."""
        ...

    def list_files(self, did: DID) -> Batches:
        """The files of a dataset (its content: a dataset holds only files), in batches, as
        :meth:`list_content` answers for it but cheaper to ask and to parse, and with md5 only for
        files that have no adler32 (Rucio's ``list_files`` gives none; the cache key needs it there,
        see ``cache/layout.py``; :meth:`get_info` gives both). For a container, the files of its
        whole tree."""
        ...

    def get_info(self, did: DID) -> DIDInfo:
        """One DID's facts (type, size, checksums, times); ``NotFoundError`` when unknown."""
        ...

    def get_metadata(self, did: DID) -> dict[str, str]:
        """Every metadata key of a DID (catalogue columns and custom keys) as text; unset keys are left
        out. ``NotFoundError`` when unknown."""
        ...

    def get_infos(self, dids: Sequence[DID]) -> list[DIDInfo]:
        """Facts of many DIDs in as few calls as the server allows; unknown DIDs are left out."""
        ...

    def list_replicas(self, dids: Sequence[DID]) -> list[FileReplicas]:
        """Available replicas of the given files, each file's best first (configured preference, then
        the server's sort). Pass file DIDs: a file without a replica comes back with none; an unknown
        DID is left out."""
        ...

    def derive_pfns(self, rse: str, dids: Sequence[DID]) -> dict[DID, str]:
        """The URLs the files would have on ``rse`` for reading, computed from its deterministic naming
        without asking whether they are there; empty when the RSE's names cannot be derived (not
        deterministic, no readable protocol)."""
        ...

    def query(self, scope: str, filters: str) -> list[DIDInfo]:
        """DIDs of ``scope`` matching a metadata filter (``run_number>=3,datatype=RAW``) or a wildcard;
        ``InvalidNameError`` for a filter that does not parse, ``NotFoundError`` for an unknown scope."""
        ...

    # -- replication rules (rule staging) ----------------------------------------------------------

    def replica_on(self, did: DID, rse: str) -> RSEReplica | None:
        """The file's replica on ``rse`` in any state (available or being copied), None when there is
        none; never cached by the caller, it is what rule staging polls."""
        ...

    def file_rules(self, did: DID) -> list[Rule]:
        """Every rule that covers the file ``did``, directly or through a collection it is in."""
        ...

    def did_rules(self, did: DID) -> list[Rule]:
        """The rules made for ``did`` itself (a file, dataset or container), by any account."""
        ...

    def add_rule(self, did: DID, rse: str, lifetime: int | None, activity: str | None,
                 account: str | None, asynchronous: bool = False) -> tuple[Rule, bool]:
        """A rule of one copy of ``did`` on ``rse``: a new one, or the account's existing rule for the
        same DID and RSE (Rucio refuses a duplicate). Returns the rule and whether it was created.
        ``asynchronous``: the server only records the rule (state INJECT) and its judge makes the locks
        later; for collections, whose locks the server would otherwise make inside the request (10,000
        files took longer than 30 s here)."""
        ...

    def get_rule(self, rule_id: str) -> Rule:
        """A rule's current state and lock counts; ``NotFoundError`` when it is gone."""
        ...

    def rule_locks(self, rule: Rule) -> list[Lock]:
        """Every lock (one per file) of a rule, with the file sizes."""
        ...
