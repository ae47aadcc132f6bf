"""An in-memory catalogue for unit tests: the same contract as the Rucio one, no server.

Tests build a data lake with ``add_*``/``attach``/``add_replica``/``set_metadata``, then hand the
fake to the code under test. Like the real adapter it blocks (it may be told to :meth:`pause`) and is
called from worker threads, so its state is guarded by one lock. Every protocol call is counted in
:attr:`calls` before anything else happens, including calls that then fail; :meth:`fail` makes calls
raise a given error to simulate an outage or refused credentials.

Listing orders follow insertion order (rucio's own order is unspecified too). ``query`` understands a
name wildcard (``*foo*``) or comma-separated ``key<op>value`` terms (``=``, ``==``, ``!=``, ``<``,
``<=``, ``>``, ``>=``) ANDed together, ``;`` ORing groups, ``type=`` selecting the DID type, and
numbers compared as numbers: enough of rucio's filter language for the filesystem's tests.

**Rule engine.** ``add_rule`` creates a REPLICATING rule with one REPLICATING lock per file under the
DID, and a copying (unavailable) replica of each file on the rule's RSE, whose PFN is
``<prefix><scope>/<name>`` (``set_rse_prefix``). Nothing moves by itself: tests call
:meth:`complete_locks` (locks OK, replicas available, rule OK once every lock is), :meth:`fail_lock`
(lock and rule STUCK with a reason) and :meth:`set_rule_state` (SUSPENDED, WAITING_APPROVAL, ...).
A second ``add_rule`` for the same DID, RSE and account returns the existing rule, as the adapter does
with Rucio's ``DuplicateRule``.
"""

from __future__ import annotations

import fnmatch
import itertools
import operator
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from datalakefs.catalogue.base import Batches
from datalakefs.errors import DatalakeError, InvalidNameError, NotFoundError
from datalakefs.model import (
    DID,
    DIDInfo,
    DIDType,
    FileReplicas,
    Lock,
    LockState,
    Replica,
    RSEReplica,
    Rule,
    RuleState,
)

#: Default creation time of fake DIDs (POSIX seconds); each added DID gets one second more.
EPOCH = 1_700_000_000.0

_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
    "=": operator.eq,
}
_TYPES = {
    "all": frozenset(DIDType),
    "collection": frozenset({DIDType.DATASET, DIDType.CONTAINER}),
    "dataset": frozenset({DIDType.DATASET}),
    "container": frozenset({DIDType.CONTAINER}),
    "file": frozenset({DIDType.FILE}),
}


@dataclass(slots=True)
class _FakeRule:
    rule: Rule
    locks: dict[DID, LockState]


@dataclass(slots=True)
class _Entry:
    info: DIDInfo
    children: list[DID] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


class FakeCatalogue:
    """A :class:`~datalakefs.catalogue.base.Catalogue` held in memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counted = threading.Condition(self._lock)  # notified when a call is counted
        self._scopes: set[str] = set()
        self._dids: dict[DID, _Entry] = {}
        self._failure: DatalakeError | None = None
        self._failing: frozenset[str] | None = None
        self._running = threading.Event()
        self._running.set()
        self.calls: Counter[str] = Counter()
        # RSEs whose PFNs derive_pfns computes: RSE -> the URL prefix of a file's name
        self.deterministic: dict[str, str] = {}
        self.account = "root"
        self._rules: dict[str, _FakeRule] = {}
        self._rule_ids = itertools.count(1)
        self._prefixes: dict[str, str] = {}
        #: (did, rse) -> available?  for replicas made by rules
        self._staged: dict[tuple[DID, str], bool] = {}

    # -- building the lake -----------------------------------------------------------------------

    def add_scope(self, scope: str) -> None:
        with self._lock:
            self._scopes.add(scope)

    def add_file(
        self,
        did: DID | str,
        size: int = 0,
        adler32: str | None = None,
        md5: str | None = None,
        *,
        created_at: float | None = None,
    ) -> DIDInfo:
        return self._add(DIDType.FILE, did, size=size, adler32=adler32, md5=md5, created_at=created_at)

    def add_dataset(self, did: DID | str, *, created_at: float | None = None) -> DIDInfo:
        return self._add(DIDType.DATASET, did, created_at=created_at)

    def add_container(self, did: DID | str, *, created_at: float | None = None) -> DIDInfo:
        return self._add(DIDType.CONTAINER, did, created_at=created_at)

    def attach(self, parent: DID | str, *children: DID | str) -> None:
        """Attach existing DIDs to a collection, like rucio's ``attach_dids``."""
        parent_did = _did(parent)
        with self._lock:
            entry = self._entry(parent_did)
            if not entry.info.type.is_collection:
                raise InvalidNameError(f"{parent_did} is a file: nothing can be attached to it")
            for child in map(_did, children):
                self._entry(child)
                if child not in entry.children:
                    entry.children.append(child)
            self._refresh_size(parent_did)

    def add_replica(self, did: DID | str, rse: str, pfn: str) -> None:
        with self._lock:
            self._entry(_did(did)).replicas.append(Replica(rse, pfn))

    def remove_replica(self, did: DID | str, rse: str) -> None:
        with self._lock:
            entry = self._entry(_did(did))
            entry.replicas[:] = [replica for replica in entry.replicas if replica.rse != rse]

    def set_metadata(self, did: DID | str, key: str, value: object) -> None:
        with self._lock:
            self._entry(_did(did)).metadata[key] = str(value)

    def set_rse_prefix(self, rse: str, prefix: str) -> None:
        """PFNs of replicas that rules make on ``rse`` start with ``prefix``."""
        with self._lock:
            self._prefixes[rse] = prefix

    # -- steering the rule engine ------------------------------------------------------------------

    def complete_locks(self, rule_id: str, count: int | None = None) -> None:
        """Turn ``count`` (all when None) REPLICATING locks of the rule OK, in file order."""
        with self._lock:
            fake = self._rules[rule_id]
            waiting = [did for did, state in fake.locks.items() if state is LockState.REPLICATING]
            for did in waiting[: len(waiting) if count is None else count]:
                fake.locks[did] = LockState.OK
                self._staged[(did, fake.rule.rse_expression)] = True
            self._recount(fake, None)

    def fail_lock(self, rule_id: str, did: DID | str, reason: str) -> None:
        """The transfer of ``did`` failed for good: its lock and the rule are STUCK with ``reason``."""
        with self._lock:
            fake = self._rules[rule_id]
            fake.locks[_did(did)] = LockState.STUCK
            self._recount(fake, reason)

    def set_rule_state(self, rule_id: str, state: RuleState) -> None:
        with self._lock:
            fake = self._rules[rule_id]
            fake.rule = replace(fake.rule, state=state)

    def delete_rule(self, rule_id: str) -> None:
        """The rule is gone (deleted or expired); replicas it was still copying are dropped."""
        with self._lock:
            fake = self._rules.pop(rule_id)
            for did, state in fake.locks.items():
                if state is not LockState.OK:
                    self._staged.pop((did, fake.rule.rse_expression), None)

    def rules(self) -> list[Rule]:
        with self._lock:
            return [fake.rule for fake in self._rules.values()]

    # -- steering the tests ----------------------------------------------------------------------

    def fail(self, error: DatalakeError | None, methods: Iterable[str] | None = None) -> None:
        """Make calls of ``methods`` (all when None) raise ``error`` until ``fail(None)``."""
        with self._lock:
            self._failure = error
            self._failing = None if methods is None else frozenset(methods)

    def pause(self) -> None:
        """Calls block (after being counted) until :meth:`resume`: a slow server."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def wait_calls(self, method: str, count: int, timeout: float) -> bool:
        """Block until ``count`` calls of ``method`` were counted (calls run in worker threads, which the
        caller's event loop does not wait for); False on timeout."""
        with self._counted:
            return self._counted.wait_for(lambda: self.calls[method] >= count, timeout)

    # -- the Catalogue protocol ------------------------------------------------------------------

    def list_scopes(self) -> list[str]:
        self._enter("list_scopes")
        with self._lock:
            return sorted(self._scopes)

    def list_collections(self, scope: str) -> list[DIDInfo]:
        self._enter("list_collections")
        with self._lock:
            self._check_scope(scope)
            return [e.info for d, e in self._dids.items() if d.scope == scope and e.info.type.is_collection]

    def list_content(self, did: DID) -> Batches:
        """The whole answer in one batch (an empty answer in none)."""
        self._enter("list_content")
        with self._lock:
            content = [_listed(self._dids[child].info) for child in self._entry(did).children]
        yield from [content] if content else []

    def list_files(self, did: DID) -> Batches:
        self._enter("list_files")
        with self._lock:
            files = [_without_redundant_md5(_listed(self._dids[d].info)) for d in self._files_under(did)]
        yield from [files] if files else []

    def get_info(self, did: DID) -> DIDInfo:
        self._enter("get_info")
        with self._lock:
            return self._entry(did).info

    def get_metadata(self, did: DID) -> dict[str, str]:
        self._enter("get_metadata")
        with self._lock:
            entry = self._entry(did)
            info = entry.info
            columns = {
                "scope": did.scope,
                "name": did.name,
                "did_type": info.type.value,
                "bytes": info.size,
                "adler32": info.adler32,
                "md5": info.md5,
            }
            meta = {key: str(value) for key, value in columns.items() if value is not None}
            meta.update(entry.metadata)
            return meta

    def get_infos(self, dids: Sequence[DID]) -> list[DIDInfo]:
        self._enter("get_infos")
        with self._lock:
            return [self._dids[did].info for did in dict.fromkeys(dids) if did in self._dids]

    def list_replicas(self, dids: Sequence[DID]) -> list[FileReplicas]:
        self._enter("list_replicas")
        with self._lock:
            entries = [self._dids[did] for did in dict.fromkeys(dids) if did in self._dids]
            files = [e for e in entries if e.info.type is DIDType.FILE]
            return [FileReplicas(_listed(e.info), tuple(e.replicas)) for e in files]

    def derive_pfns(self, rse: str, dids: Sequence[DID]) -> dict[DID, str]:
        """``deterministic[rse]`` + the name, for an RSE a test made deterministic."""
        self._enter("derive_pfns")
        prefix = self.deterministic.get(rse)
        return {} if prefix is None else {did: f"{prefix}{did.name}" for did in dids}

    def query(self, scope: str, filters: str) -> list[DIDInfo]:
        self._enter("query")
        groups = _parse_filter(filters)
        with self._lock:
            self._check_scope(scope)
            return [
                _listed(e.info)
                for d, e in self._dids.items()
                if d.scope == scope and any(_matches(e, group) for group in groups)
            ]

    # -- replication rules -----------------------------------------------------------------------

    def replica_on(self, did: DID, rse: str) -> RSEReplica | None:
        self._enter("replica_on")
        with self._lock:
            entry = self._entry(did)
            pfns = tuple(r.pfn for r in entry.replicas if r.rse == rse)
            if pfns:
                return RSEReplica(rse, True, pfns)
            available = self._staged.get((did, rse))
            if available is None:
                return None
            return RSEReplica(rse, available, (self._pfn(did, rse),))

    def file_rules(self, did: DID) -> list[Rule]:
        self._enter("file_rules")
        with self._lock:
            self._entry(did)
            return [fake.rule for fake in self._rules.values() if did in fake.locks]

    def did_rules(self, did: DID) -> list[Rule]:
        self._enter("did_rules")
        with self._lock:
            self._entry(did)
            return [fake.rule for fake in self._rules.values() if fake.rule.did == did]

    def add_rule(self, did: DID, rse: str, lifetime: int | None, activity: str | None,
                 account: str | None, asynchronous: bool = False) -> tuple[Rule, bool]:
        self._enter("add_rule")
        owner = account or self.account
        with self._lock:
            for fake in self._rules.values():
                rule = fake.rule
                if rule.did == did and rule.rse_expression == rse and rule.account == owner:
                    return rule, False
            files = self._files_under(did)
            locks = {}
            for file in files:
                already = any(r.rse == rse for r in self._dids[file].replicas) or self._staged.get((file, rse))
                locks[file] = LockState.OK if already else LockState.REPLICATING
                if not already:
                    self._staged[(file, rse)] = False
            rule = Rule(f"rule{next(self._rule_ids):04d}", did, rse, RuleState.REPLICATING, owner)
            fake = _FakeRule(rule, locks)
            self._rules[rule.id] = fake
            self._recount(fake, None)
            return fake.rule, True

    def get_rule(self, rule_id: str) -> Rule:
        self._enter("get_rule")
        with self._lock:
            if rule_id not in self._rules:
                raise NotFoundError(f"fake catalogue: no rule {rule_id}")
            return self._rules[rule_id].rule

    def rule_locks(self, rule: Rule) -> list[Lock]:
        self._enter("rule_locks")
        with self._lock:
            fake = self._rules[rule.id]
            return [Lock(did, rule.rse_expression, state, self._dids[did].info.size or 0)
                    for did, state in fake.locks.items()]

    # -- internals -------------------------------------------------------------------------------

    def _files_under(self, did: DID) -> list[DID]:
        entry = self._entry(did)
        if entry.info.type is DIDType.FILE:
            return [did]
        return [f for child in entry.children for f in self._files_under(child)]

    def _pfn(self, did: DID, rse: str) -> str:
        return f"{self._prefixes.get(rse, f'https://{rse.lower()}.fake/')}{did.scope}/{did.name}"

    def _recount(self, fake: _FakeRule, error: str | None) -> None:
        states = list(fake.locks.values())
        ok, stuck = states.count(LockState.OK), states.count(LockState.STUCK)
        rule = replace(fake.rule, locks_ok=ok, locks_replicating=states.count(LockState.REPLICATING),
                       locks_stuck=stuck, error=error if error is not None else fake.rule.error)
        if stuck:
            rule = replace(rule, state=RuleState.STUCK)
        elif ok == len(states):
            rule = replace(rule, state=RuleState.OK, error=None)
        fake.rule = rule

    def _enter(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1
            self._counted.notify_all()
            failing = self._failing is None or method in self._failing
            error = self._failure if failing else None
        self._running.wait()
        if error is not None:
            raise _copy(error)

    def _add(
        self,
        kind: DIDType,
        did: DID | str,
        *,
        size: int | None = None,
        adler32: str | None = None,
        md5: str | None = None,
        created_at: float | None = None,
    ) -> DIDInfo:
        did = _did(did)
        with self._lock:
            if did in self._dids:
                raise InvalidNameError(f"{did} already exists")
            self._scopes.add(did.scope)
            when = EPOCH + len(self._dids) if created_at is None else created_at
            info = DIDInfo(did, kind, size, adler32, md5, created_at=when, updated_at=when)
            self._dids[did] = _Entry(info)
            return info

    def _entry(self, did: DID) -> _Entry:
        try:
            return self._dids[did]
        except KeyError:
            raise NotFoundError(f"fake catalogue: no DID {did}") from None

    def _check_scope(self, scope: str) -> None:
        if scope not in self._scopes:
            raise NotFoundError(f"fake catalogue: no scope {scope}")

    def _refresh_size(self, did: DID) -> None:
        entry = self._dids[did]
        if entry.info.type is DIDType.DATASET:
            total = sum(self._dids[c].info.size or 0 for c in entry.children)
            entry.info = replace(entry.info, size=total)


def _did(did: DID | str) -> DID:
    return did if isinstance(did, DID) else DID.parse(did)


def _listed(info: DIDInfo) -> DIDInfo:
    """What a listing tells about a DID: no times (rucio's listings carry none)."""
    return replace(info, created_at=0.0, updated_at=0.0)


def _without_redundant_md5(info: DIDInfo) -> DIDInfo:
    """What ``list_files`` tells about a file: Rucio's gives no md5, the adapter adds it where there
    is no adler32."""
    return replace(info, md5=None) if info.adler32 else info


def _copy(error: DatalakeError) -> DatalakeError:
    """A fresh exception per call, so tracebacks of concurrent failures do not pile up on one."""
    return type(error)(*error.args)


_Term = tuple[str, Callable[[Any, Any], bool], str]


def _parse_filter(text: str) -> list[list[_Term]]:
    text = text.strip()
    if not text:
        raise InvalidNameError("an empty query matches nothing")
    if not any(op in text for op in "=<>!"):
        return [[("name", operator.eq, text)]]
    groups: list[list[_Term]] = []
    for group_text in filter(None, (g.strip() for g in text.split(";"))):
        group: list[_Term] = []
        for term in filter(None, (t.strip() for t in group_text.split(","))):
            for symbol, compare in _OPERATORS.items():
                key, sep, value = term.partition(symbol)
                if sep:
                    if not key.strip() or not value.strip():
                        raise InvalidNameError(f"filter term {term!r} is incomplete")
                    group.append((key.strip(), compare, value.strip()))
                    break
            else:
                raise InvalidNameError(f"filter term {term!r} has no operator")
        groups.append(group)
    return groups


def _matches(entry: _Entry, group: list[_Term]) -> bool:
    kinds = _TYPES["all"]
    for key, compare, wanted in group:
        if key == "type":
            if wanted.lower() not in _TYPES:
                raise InvalidNameError(f"{wanted!r} is not a DID type")
            kinds = _TYPES[wanted.lower()]
        elif key == "name":
            matched = fnmatch.fnmatchcase(entry.info.did.name, wanted)
            if matched != (compare is not operator.ne):
                return False
        else:
            value = entry.metadata.get(key)
            if value is None or not compare(*_comparable(value, wanted)):
                return False
    return entry.info.type in kinds


def _comparable(value: str, wanted: str) -> tuple[object, object]:
    """Both as numbers when both are numbers, else both as text."""
    try:
        return float(value), float(wanted)
    except ValueError:
        return value, wanted
