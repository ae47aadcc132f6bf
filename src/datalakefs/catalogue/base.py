"""The catalogue protocol, in datalakefs' own types.

Implementations block (rucio-clients uses ``requests``): they are called from worker threads only.
Errors are translated at this boundary: an unknown DID raises ``NotFoundError``, refused credentials
``AccessDeniedError``, a server that cannot be reached or fails ``CatalogueUnavailableError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from datalakefs.model import DID, DIDInfo, FileReplicas


class Catalogue(Protocol):
    def list_scopes(self) -> list[str]:
        """Every scope, sorted."""
        ...

    def list_collections(self, scope: str) -> list[DIDInfo]:
        """The datasets and containers of ``scope``; ``NotFoundError`` when there is no such scope."""
        ...

    def list_content(self, did: DID) -> list[DIDInfo]:
        """The direct children of a collection, with size and checksums for files."""
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

    def query(self, scope: str, filters: str) -> list[DIDInfo]:
        """DIDs of ``scope`` matching a metadata filter (``run_number>=3,datatype=RAW``) or a wildcard;
        ``InvalidNameError`` for a filter that does not parse, ``NotFoundError`` for an unknown scope."""
        ...
