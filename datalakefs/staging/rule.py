"""Rule staging: make DIDs available on the staging RSE with a replication rule, and follow it.

:class:`RuleStager` keeps one :class:`Staging` record per DID it was asked about (files opened in rule
mode, files read in the hybrid path, collections staged with ``user.datalakefs.stage``). Contracts:

* **One rule per DID and RSE.** Before creating a rule the stager looks up the rules that already
  cover a file (its own rule or one of a dataset or container it is in) and reuses one whose RSE
  expression is exactly ``staging_rse``; the catalogue adapter also returns the account's existing
  rule when Rucio refuses a duplicate. Setting up a DID is serialized per DID, so concurrent opens
  make one rule.
* **A file is staged when its replica on the staging RSE is AVAILABLE** (Rucio turns the replica
  available and the lock OK together). A file already there needs no rule at all.
* **Rule states are kept apart.** STUCK (or a stuck lock of this file) is a failure: ``open()`` gets
  ``TransferError`` (EIO) with the rule's error text. SUSPENDED, WAITING_APPROVAL and INJECT are
  reported as such and waited for like REPLICATING.
* **Polling backs off and stops when nobody waits.** A file's rule is polled only while someone waits
  for it (a blocked ``open()``, a hybrid reader): first after ``poll_min`` seconds, then at twice the
  previous interval up to ``poll_max``. An open with ``O_NONBLOCK``, or a read of the state, polls once
  when the last answer is older than ``poll_min``. Collections staged on request are polled until the
  rule is OK or STUCK (the user asked for them).
* Everything runs on the trio thread; catalogue calls go to worker threads through the cached
  catalogue, which never caches rule answers.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from datalakefs.background import Background
from datalakefs.catalogue.cached import CachedCatalogue
from datalakefs.config import Config
from datalakefs.errors import ConfigError, DatalakeError, NotFoundError, TransferError, TryAgainError
from datalakefs.model import DID, DIDInfo, DIDType, RSEReplica, Rule, RuleState

log = logging.getLogger(__name__)

#: How many staged files ``status()`` lists (the most recently touched first); counts cover all.
STATUS_FILES = 200


@dataclass(slots=True)
class Staging:
    """What the stager knows about one DID on the staging RSE."""

    did: DID
    is_file: bool
    rule: Rule | None = None
    replica: RSEReplica | None = None
    created: bool = False  # the rule was made by this daemon
    error: str | None = None  # a catalogue failure while following the rule
    waiters: int = 0
    polled_at: float = -1.0  # trio time of the last answer
    touched: float = field(default_factory=time.time)  # wall clock, for status.json
    changed: trio.Event = field(default_factory=trio.Event)
    polling: bool = False
    setup: trio.Lock = field(default_factory=trio.Lock)

    @property
    def ready(self) -> bool:
        if self.is_file:
            return self.replica is not None and self.replica.available
        return self.rule is not None and self.rule.state is RuleState.OK

    @property
    def stuck(self) -> bool:
        return not self.ready and self.rule is not None and self.rule.state is RuleState.STUCK

    @property
    def finished(self) -> bool:
        return self.ready or self.stuck

    def describe(self) -> str:
        """One line for ``user.datalakefs.state``: rule id, state, locks OK/total, error."""
        rule = self.rule
        where = self.replica.rse if self.replica is not None else (rule.rse_expression if rule else "")
        if rule is None:
            head = f"staged on {where}" if self.ready else "not staged"
        else:
            state = "OK" if self.ready else rule.state.value
            head = f"rule {rule.id} {state}: {rule.locks_ok}/{rule.locks_total} locks OK"
            if rule.locks_stuck:
                head += f", {rule.locks_stuck} stuck"
            if self.ready and self.is_file:
                head += f"; staged on {where}"
            if rule.error and not self.ready:
                head += f"; error: {rule.error}"
        if self.error:
            head += f"; last check failed: {self.error}"
        return head

    def as_dict(self) -> dict[str, Any]:
        rule = self.rule
        return {
            "did": str(self.did),
            "rule_id": rule.id if rule else None,
            "state": ("OK" if self.ready else rule.state.value) if rule else ("STAGED" if self.ready else None),
            "rule_state": rule.state.value if rule else None,
            "locks_ok": rule.locks_ok if rule else None,
            "locks_total": rule.locks_total if rule else None,
            "locks_stuck": rule.locks_stuck if rule else None,
            "error": (rule.error if rule and not self.ready else None) or self.error,
            "created_here": self.created,
            "waiters": self.waiters,
            "updated_at": round(self.touched, 3),
        }

    def notify(self) -> None:
        self.touched = time.time()
        self.changed.set()
        self.changed = trio.Event()


class RuleStager:
    """Creates, reuses and follows staging rules (see the module docstring).

    Start it with ``await nursery.start(stager.run)``: pollers run in its nursery.
    """

    def __init__(
        self,
        config: Config,
        catalogue: CachedCatalogue,
        *,
        poll_min: float = 0.5,
        poll_max: float = 8.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._config = config
        self._catalogue = catalogue
        self.poll_min = poll_min
        self.poll_max = max(poll_min, poll_max)
        self._clock = clock
        self._tracked: dict[DID, Staging] = {}
        self._background = Background()
        self.counters: Counter[str] = Counter()

    @property
    def rse(self) -> str:
        if not self._config.staging_rse:
            raise ConfigError("option staging_rse: rule staging needs a staging RSE")
        return self._config.staging_rse

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._background.run(task_status=task_status)

    # -- what the content services ask ---------------------------------------------------------

    def known(self, did: DID) -> Staging | None:
        return self._tracked.get(did)

    async def replica(self, info: DIDInfo) -> RSEReplica | None:
        """The file's replica on the staging RSE (any state), asked now; remembered when tracked. A
        staged replica that disappeared (its rule expired) makes the next open look for rules again."""
        found = await self._catalogue.replica_on(info.did, self.rse)
        self.counters["replica_checks"] += 1
        tracked = self._tracked.get(info.did)
        if tracked is not None:
            if found is None and tracked.ready:
                tracked.rule = None
            tracked.replica = found
        return found

    async def stage_file(self, info: DIDInfo, wait: bool, known: RSEReplica | None = None) -> RSEReplica:
        """The file's available replica on the staging RSE, staging it by rule when needed.

        ``wait``: block up to ``staging_timeout``; else raise ``TryAgainError`` at once while it
        replicates. A STUCK rule raises ``TransferError`` with its reason. ``known``: the replica the
        caller just got from :meth:`replica` (saves asking again)."""
        tracked = await self._setup(info, Staging(info.did, is_file=True, replica=known), known is not None)
        if not tracked.finished and self._stale(tracked):
            await self._poll(tracked)
        if wait and not tracked.finished:
            tracked.waiters += 1
            self._start_polling(tracked)
            try:
                with trio.move_on_after(self._config.staging_timeout):
                    while not tracked.finished and tracked.rule is not None:
                        await tracked.changed.wait()
            finally:
                tracked.waiters -= 1
        return self._outcome(tracked)

    def watch(self, info: DIDInfo) -> Staging:
        """For a file opened in ``auto`` that is being streamed: look for its staging replica in the
        background (the open does not wait for that answer) and follow it while it is being copied,
        so the reader can switch once it is staged. The caller must :meth:`release` it."""
        tracked = self._tracked.setdefault(info.did, Staging(info.did, is_file=True))
        tracked.waiters += 1
        if not tracked.ready:
            self._background.start_soon(self._first_look, info, tracked)
        return tracked

    async def _first_look(self, info: DIDInfo, tracked: Staging) -> None:
        try:
            replica = await self.replica(info)
        except DatalakeError as exc:
            log.warning("staging %s: looking for a staged replica failed: %s", info.did, exc)
            return
        tracked.replica = replica
        tracked.polled_at = self._clock()
        if replica is not None:
            tracked.notify()
            if not replica.available and tracked.waiters > 0:
                self.counters["followed_while_copying"] += 1
                self._start_polling(tracked)

    def note_staged(self, info: DIDInfo, replica: RSEReplica) -> None:
        """Remember a file found staged, so that its state says so."""
        tracked = self._tracked.setdefault(info.did, Staging(info.did, is_file=True))
        if not tracked.ready:
            tracked.replica = replica
            tracked.polled_at = self._clock()
            tracked.notify()

    def release(self, tracked: Staging) -> None:
        tracked.waiters = max(0, tracked.waiters - 1)

    async def stage(self, info: DIDInfo) -> Staging:
        """Stage a file or a whole collection with one rule (``user.datalakefs.stage``); followed in
        the background until the rule is OK or STUCK."""
        tracked = await self._setup(info, Staging(info.did, is_file=info.type is DIDType.FILE))
        self._start_polling(tracked)
        return tracked

    async def look_up(self, info: DIDInfo) -> None:
        """Follow a rule on the staging RSE that this daemon did not make (``datalakefs stage``, another
        mount, the rucio CLI, another account), so that the state of the DID reports it. One look per
        call while the DID has no rule here; a DID that has one is followed as any other."""
        known = self._tracked.get(info.did)
        if known is not None and (known.rule is not None or known.ready):
            return
        is_file = info.type is DIDType.FILE
        if is_file:
            rule = await self._covering(info.did)
        else:
            rules = [r for r in await self._catalogue.did_rules(info.did) if r.rse_expression == self.rse]
            rules.sort(key=lambda r: r.state is RuleState.STUCK)
            rule = rules[0] if rules else None
        if rule is None:
            return
        tracked = self._tracked.setdefault(info.did, Staging(info.did, is_file=is_file))
        tracked.rule = rule
        if is_file:
            await self.replica(info)
        self.counters["rules_found"] += 1
        tracked.polled_at = self._clock()
        tracked.notify()

    def describe(self, did: DID) -> str | None:
        """The state line of a tracked DID, None when untracked. An answer older than ``poll_min`` of
        an unfinished rule that nobody polls gets one poll in the background, so that reading the
        state repeatedly shows progress without anyone waiting."""
        tracked = self._tracked.get(did)
        if tracked is None or (tracked.rule is None and tracked.replica is None):
            return None
        if not tracked.finished and not tracked.polling and self._stale(tracked):
            tracked.polling = self._background.start_soon(self._poll_once, tracked)
        return tracked.describe()

    def status(self) -> dict[str, Any]:
        files = sorted((t for t in self._tracked.values() if t.is_file and (t.rule or t.replica)),
                       key=lambda t: -t.touched)
        rules: dict[str, dict[str, Any]] = {}
        for tracked in self._tracked.values():
            rule = tracked.rule
            if rule is not None and (not tracked.ready or not tracked.is_file):
                rules.setdefault(rule.id, {
                    "id": rule.id,
                    "did": str(rule.did),
                    "rse_expression": rule.rse_expression,
                    "state": rule.state.value,
                    "locks_ok": rule.locks_ok,
                    "locks_total": rule.locks_total,
                    "locks_stuck": rule.locks_stuck,
                    "error": rule.error,
                })
        return {
            "rse": self._config.staging_rse,
            "files_tracked": len(files),
            "files_staged": sum(1 for t in files if t.ready),
            "files": [t.as_dict() for t in files[:STATUS_FILES]],
            "collections": [t.as_dict() for t in self._tracked.values() if not t.is_file],
            "active_rules": [r for r in rules.values() if r["state"] not in ("OK",)],
            "rules": list(rules.values()),
            "counters": dict(self.counters),
        }

    # -- internals -----------------------------------------------------------------------------

    async def _setup(self, info: DIDInfo, fresh: Staging, replica_known: bool = False) -> Staging:
        """The DID's record with a rule found or made (files already on the RSE need none)."""
        tracked = self._tracked.setdefault(info.did, fresh)
        async with tracked.setup:
            if tracked.rule is not None or tracked.ready:
                return tracked
            rse = self.rse
            if tracked.is_file:
                if not replica_known:
                    tracked.replica = await self.replica(info)
                if tracked.ready:
                    tracked.polled_at = self._clock()
                    tracked.notify()
                    return tracked
                tracked.rule = await self._covering(info.did)
                if tracked.rule is not None:
                    self.counters["rules_reused"] += 1
                    log.info("staging %s: reusing rule %s (%s)", info.did, tracked.rule.id,
                             tracked.rule.state.value)
            if tracked.rule is None:
                config = self._config
                rule, created = await self._catalogue.add_rule(
                    info.did, rse, config.rule_lifetime or None, config.rule_activity, config.rule_account,
                    asynchronous=info.type.is_collection)
                tracked.rule, tracked.created = rule, created
                self.counters["rules_created" if created else "rules_reused"] += 1
                log.info("staging %s: %s rule %s on %s", info.did, "created" if created else "reusing",
                         rule.id, rse)
            tracked.polled_at = self._clock()
            tracked.notify()
        return tracked

    async def _covering(self, did: DID) -> Rule | None:
        """The best rule on the staging RSE covering the file: not STUCK first, the file's own first."""
        covering = [r for r in await self._catalogue.file_rules(did) if r.rse_expression == self.rse]
        covering.sort(key=lambda r: (r.state is RuleState.STUCK, r.did != did))
        return covering[0] if covering else None

    def _outcome(self, tracked: Staging) -> RSEReplica:
        if tracked.ready:
            assert tracked.replica is not None
            return tracked.replica
        if tracked.stuck:
            self.counters["stuck_opens"] += 1
            raise TransferError(f"{tracked.did}: {tracked.describe()}")
        self.counters["not_ready_opens"] += 1
        raise TryAgainError(f"{tracked.did}: {tracked.describe()}")

    def _stale(self, tracked: Staging) -> bool:
        return self._clock() - tracked.polled_at >= self.poll_min

    def _start_polling(self, tracked: Staging) -> None:
        if not tracked.polling and not tracked.finished:
            tracked.polling = self._background.start_soon(self._poller, tracked)

    async def _poller(self, tracked: Staging) -> None:
        interval = self.poll_min
        try:
            while True:
                await trio.sleep(interval)
                if tracked.finished or (tracked.is_file and tracked.waiters == 0):
                    break
                await self._poll(tracked)
                interval = min(interval * 2, self.poll_max)
        finally:
            tracked.polling = False

    async def _poll_once(self, tracked: Staging) -> None:
        try:
            await self._poll(tracked)
        finally:
            tracked.polling = False
        if tracked.waiters > 0:
            self._start_polling(tracked)

    async def _poll(self, tracked: Staging) -> None:
        """One look at the rule and (for a file) its replica on the staging RSE."""
        self.counters["polls"] += 1
        try:
            if tracked.is_file:
                tracked.replica = await self._catalogue.replica_on(tracked.did, self.rse)
            if tracked.is_file and tracked.rule is None and not tracked.ready:
                tracked.rule = await self._covering(tracked.did)
            elif tracked.rule is not None and tracked.rule.state is not RuleState.OK:
                tracked.rule = await self._catalogue.get_rule(tracked.rule.id)
            tracked.error = None
        except NotFoundError as exc:
            # the rule was deleted (or expired): forget it, so the next open looks again
            tracked.error = f"rule {tracked.rule.id if tracked.rule else ''} is gone ({exc})"
            tracked.rule = None
        except DatalakeError as exc:
            tracked.error = str(exc)
            log.warning("staging %s: checking the rule failed: %s", tracked.did, exc)
        tracked.polled_at = self._clock()
        if tracked.finished:
            log.info("staging %s: %s", tracked.did, tracked.describe())
        tracked.notify()
