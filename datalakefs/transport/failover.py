"""One failover loop over a file's replicas, for every kind of range transfer (blocks and pieces).

A file's :class:`ReplicaChoice` holds its candidate URLs (XCache first; see
:mod:`datalakefs.transport.replicas`), looked up on the first transfer, so opening a file costs
nothing. :meth:`Failover.run` tries them: a failed attempt (5xx, timeout, reset, short body, wrong range
reply) moves on to the next candidate at once; after every candidate failed, it waits (``backoff``,
doubling) and tries them all again, ``retries`` more times. Candidates that answered 401/403/404 are not
asked again by that transfer. A transfer starts with the candidate that last worked for the file, or
with the one after the candidate that last failed. When the candidates were *presumed* (a guess from
the file's dataset, ``FileReplicas.presumed``) and all failed, the catalogue is asked where the file
really is, once per open file, and the loop runs again over its answer. When every attempt failed the
transfer raises ``TransferError`` listing each attempt's reason, or ``AccessDeniedError`` when every
candidate refused access.

What a file learns stays with its open file, but one thing is the whole mount's: an endpoint (scheme,
host and port) that a connection failed to reach (refused, or no answer to the connect in time) is tried
*last* by every transfer for ``UNREACHABLE_FOR`` seconds (:class:`Endpoints`, as nginx's upstream
``fail_timeout``). Without it a dead XCache cost each file of a dataset a connection attempt (far away, a
connect timeout) and a warning: 4,431 of them for one `cat` of the 10k dataset while the demo's XCache
was down. It is never skipped: it stays a candidate when the others fail, and the first transfer after
the cool-down tries it in its usual place again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import trio

from datalakefs.config import Config
from datalakefs.errors import AccessDeniedError, DatalakeError, TransferError
from datalakefs.model import DID, FileReplicas
from datalakefs.transport.http import FailureKind, RangeReadError
from datalakefs.transport.replicas import Candidate, candidates

log = logging.getLogger(__name__)

#: Seconds an endpoint a connection could not reach is tried after the others (see the module docstring)
UNREACHABLE_FOR = 10.0

#: Where a file's replicas are; ``True`` asks the catalogue itself, not a guess from the file's dataset
#: (``FileReplicas.presumed``), once a transfer found the file at none of the presumed places.
Locate = Callable[[bool], Awaitable[FileReplicas]]

#: One attempt of a transfer from one candidate: returns ``None`` when the transfer is complete, else
#: why some of it is still missing (the attempt counts as failed but the candidate stays preferred);
#: raises :class:`RangeReadError` when the candidate failed.
Attempt = Callable[[Candidate], Awaitable[str | None]]


def known_replicas(file: FileReplicas) -> Locate:
    """A :data:`Locate` for replicas already at hand."""

    async def locate(confirmed: bool) -> FileReplicas:
        return file

    return locate


class ReplicaChoice:
    """The candidate URLs of one open file, and which of them to try first."""

    def __init__(self, did: DID, locate: Locate, config: Config) -> None:
        self.did = did
        self._locate = locate
        self._config = config
        self._presumed = False
        self._candidates: tuple[Candidate, ...] | None = None
        self._locating: trio.Lock | None = None
        self._preferred: Candidate | None = None

    async def candidates(self) -> tuple[Candidate, ...]:
        """The URLs to try, the one that last worked first; looked up once per open file."""
        if self._candidates is None:
            if self._locating is None:
                self._locating = trio.Lock()
            async with self._locating:
                if self._candidates is None:
                    located = await self._locate(False)
                    self._presumed = located.presumed
                    self._candidates = candidates(located, self._config)
        found, preferred = self._candidates, self._preferred
        if preferred is not None and preferred in found:
            at = found.index(preferred)
            return found[at:] + found[:at]
        return found

    async def confirm(self) -> bool:
        """Every candidate failed: if they were presumed, ask the catalogue where the file is and
        return True (try again); False when the catalogue's own answer already failed."""
        if not self._presumed:
            return False
        assert self._locating is not None  # candidates() ran
        async with self._locating:
            if self._presumed:
                log.info("%s: not where its dataset's files are; asking the catalogue", self.did)
                self._candidates = candidates(await self._locate(True), self._config)
                self._presumed, self._preferred = False, None
        return True

    def prefer(self, candidate: Candidate) -> None:
        self._preferred = candidate

    def demote(self, candidate: Candidate) -> None:
        """``candidate`` just failed: later transfers start with the one after it."""
        found = self._candidates or ()
        if candidate in found and self._preferred in (None, candidate):
            self._preferred = found[(found.index(candidate) + 1) % len(found)]


def _endpoint(candidate: Candidate) -> str:
    """scheme://host:port of the candidate's URL (never its user info: it is logged)."""
    parts = urlsplit(candidate.url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class Endpoints:
    """The endpoints a mount's connections could not reach lately, and until when they are tried last."""

    def __init__(self) -> None:
        self._for = UNREACHABLE_FOR
        self._until: dict[str, float] = {}

    def order(self, options: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        """``options`` with the candidates of unreachable endpoints moved last (otherwise in order)."""
        if not self._until:
            return options
        now = trio.current_time()
        last = tuple(c for c in options if self._until.get(_endpoint(c), now) > now)
        return tuple(c for c in options if c not in last) + last if last else options

    def unreachable(self, candidate: Candidate, why: RangeReadError) -> None:
        endpoint = _endpoint(candidate)
        if endpoint not in self._until:
            log.warning("%s could not be reached (%s): every transfer tries it last for %g s",
                        endpoint, why, self._for)
        self._until[endpoint] = trio.current_time() + self._for

    def reached(self, candidate: Candidate) -> None:
        if self._until and self._until.pop(_endpoint(candidate), None) is not None:
            log.info("%s answers again", _endpoint(candidate))


class Failover:
    """The failover policy of a mount's transfers (see the module docstring); counts failed attempts."""

    def __init__(self, *, retries: int, backoff: float) -> None:
        self._retries = max(0, retries)
        self._backoff = backoff
        self._endpoints = Endpoints()
        self.failed_attempts = 0

    async def run(self, replicas: ReplicaChoice, attempt: Attempt, what: str) -> None:
        """Run ``attempt`` over the candidates until it completes; raises when every attempt failed.
        ``what`` names the transfer in the log."""
        reasons: list[str] = []
        kinds: list[FailureKind | None] = []
        while True:  # a second time only after presumed replicas failed (ReplicaChoice.confirm)
            options = await replicas.candidates()
            if not options:
                raise TransferError(f"{replicas.did}: no replica is readable over HTTP")
            if await self._rounds(replicas, options, attempt, what, reasons, kinds):
                return
            if not await replicas.confirm():
                break
        raise _gave_up(replicas.did, reasons, kinds)

    async def _rounds(
        self,
        replicas: ReplicaChoice,
        options: tuple[Candidate, ...],
        attempt: Attempt,
        what: str,
        reasons: list[str],
        kinds: list[FailureKind | None],
    ) -> bool:
        """Try the candidates in rounds; True once an attempt completed the transfer."""
        refused: set[Candidate] = set()
        for round_ in range(1 + self._retries):
            if round_:
                await trio.sleep(self._backoff * 2 ** (round_ - 1))
            for candidate in self._endpoints.order(options):
                if candidate in refused:
                    continue
                try:
                    missing = await attempt(candidate)
                except RangeReadError as exc:
                    self.failed_attempts += 1
                    reasons.append(str(exc))
                    kinds.append(exc.kind)
                    log.warning("%s: %s from %s: %s", replicas.did, what, candidate, exc)
                    if exc.kind is FailureKind.CONNECTION:
                        self._endpoints.unreachable(candidate, exc)
                    if not exc.kind.retryable:
                        refused.add(candidate)
                    replicas.demote(candidate)
                    continue
                self._endpoints.reached(candidate)
                if missing is None:
                    replicas.prefer(candidate)
                    return True
                reasons.append(f"{candidate}: {missing}")
                kinds.append(None)
            if len(refused) == len(options):
                break
        return False


def _gave_up(did: DID, reasons: list[str], kinds: list[FailureKind | None]) -> DatalakeError:
    """The error of a transfer after every attempt failed: EACCES when every candidate refused access."""
    denied = bool(kinds) and all(kind is FailureKind.DENIED for kind in kinds)
    error_type = AccessDeniedError if denied else TransferError
    message = f"{did}: every replica failed: " + "; ".join(reasons)
    log.error("%s", message)
    return error_type(message)
