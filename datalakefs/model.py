"""Frozen value types shared by every layer: DIDs, their catalogue facts, replicas; and what a read returns.

They are built by the catalogue adapter from rucio's dicts and are never mutated afterwards; no
``dict[str, Any]`` travels past that adapter.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeAlias

#: What a file read returns: its bytes, possibly a view of a buffer the daemon reuses (a block held in
#: memory, see ``cache/writer.py``). Valid until the reading task's next ``await``: whoever holds it
#: across one must copy it first. The FUSE reply is written before the read handler's task awaits again.
ReadBuffer: TypeAlias = bytes | bytearray | memoryview


class DIDType(enum.Enum):
    FILE = "FILE"
    DATASET = "DATASET"
    CONTAINER = "CONTAINER"

    @property
    def is_collection(self) -> bool:
        return self is not DIDType.FILE


@dataclass(frozen=True, slots=True, order=True)
class DID:
    """A data identifier ``scope:name``."""

    scope: str
    name: str

    def __str__(self) -> str:
        return f"{self.scope}:{self.name}"

    @classmethod
    def parse(cls, text: str, default_scope: str | None = None) -> DID:
        """Parse ``scope:name``; a bare name takes ``default_scope``."""
        scope, sep, name = text.partition(":")
        if sep:
            return cls(scope, name)
        if default_scope is None:
            raise ValueError(f"{text!r} is not of the form scope:name")
        return cls(default_scope, text)


@dataclass(frozen=True, slots=True)
class DIDInfo:
    """What the catalogue knows about one DID. Times are POSIX seconds."""

    did: DID
    type: DIDType
    size: int | None = None
    adler32: str | None = None
    md5: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Replica:
    """One readable copy of a file: the RSE and the URL (PFN) to read it from."""

    rse: str
    pfn: str


@dataclass(frozen=True, slots=True)
class FileReplicas:
    """A file and its available replicas, best first.

    ``presumed``: the replicas were not asked for but derived from the file's dataset (the RSEs that
    hold every file the catalogue was asked about, and their deterministic names); a reader that
    finds none of them there asks the catalogue (see docs/ARCHITECTURE.md, "Replicas per dataset").
    """

    info: DIDInfo
    replicas: tuple[Replica, ...]
    presumed: bool = False

    def by_preference(self, preference: tuple[str, ...]) -> list[Replica]:
        """The replicas with the RSEs of ``preference`` first, in its order; otherwise order kept."""
        rank = {rse: i for i, rse in enumerate(preference)}
        return sorted(self.replicas, key=lambda r: rank.get(r.rse, len(rank)))


class RuleState(enum.Enum):
    """States of a Rucio replication rule, kept apart: each means something different to a reader."""

    OK = "OK"
    REPLICATING = "REPLICATING"
    STUCK = "STUCK"
    SUSPENDED = "SUSPENDED"
    WAITING_APPROVAL = "WAITING_APPROVAL"
    INJECT = "INJECT"


@dataclass(frozen=True, slots=True)
class Rule:
    """A replication rule: what it covers, where to, and its progress (lock counts)."""

    id: str
    did: DID
    rse_expression: str
    state: RuleState
    account: str = ""
    locks_ok: int = 0
    locks_replicating: int = 0
    locks_stuck: int = 0
    error: str | None = None

    @property
    def locks_total(self) -> int:
        return self.locks_ok + self.locks_replicating + self.locks_stuck


class LockState(enum.Enum):
    OK = "OK"
    REPLICATING = "REPLICATING"
    STUCK = "STUCK"


@dataclass(frozen=True, slots=True)
class Lock:
    """One file's lock of a rule: the file is (being) replicated to ``rse``."""

    did: DID
    rse: str
    state: LockState
    size: int = 0


@dataclass(frozen=True, slots=True)
class RSEReplica:
    """A file's replica on one RSE in whatever state it is (``available`` false while it is being
    copied there) and the URLs it has or will have there."""

    rse: str
    available: bool
    pfns: tuple[str, ...]
