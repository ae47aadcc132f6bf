"""The catalogue calls of a workload as the Rucio server saw them, to check the daemon's own counters.

The demo lake's Rucio servers (plain HTTP and the TLS front) are gunicorns that log every request to
``<state>/log/rucio-access.log`` and ``rucio-tls-access.log`` (datalakefs/demo/services/rucio.py).
:class:`RucioRequests` marks where those logs end before a workload and counts the requests logged
after it; token requests (``/auth/...``) are not catalogue calls and are counted apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ACCESS_LOGS = ("rucio-access.log", "rucio-tls-access.log")
REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+"')


@dataclass(frozen=True)
class RequestCount:
    catalogue: int
    auth: int


def count_requests(lines: Iterable[str]) -> RequestCount:
    """Requests in gunicorn access-log lines; lines that hold no request are skipped."""
    catalogue = auth = 0
    for line in lines:
        match = REQUEST.search(line)
        if match is None:
            continue
        if match.group(2).startswith("/auth/"):
            auth += 1
        else:
            catalogue += 1
    return RequestCount(catalogue, auth)


def compare(daemon_calls: int, logged: RequestCount) -> str:
    """One line for a row's note: both counts, and MISMATCH when they differ."""
    verdict = "match" if daemon_calls == logged.catalogue else "MISMATCH"
    return (f"catalogue calls: daemon {daemon_calls}, Rucio access log {logged.catalogue} "
            f"(+{logged.auth} token requests): {verdict}")


class RucioRequests:
    """Counts the requests the lake's Rucio servers log between :meth:`mark` and :meth:`count`."""

    def __init__(self, log_dir: Path) -> None:
        self.paths = [log_dir / name for name in ACCESS_LOGS]
        self.offsets: dict[Path, int] = {}

    def mark(self) -> None:
        self.offsets = {path: path.stat().st_size if path.exists() else 0 for path in self.paths}

    def count(self) -> RequestCount:
        """The requests logged since :meth:`mark` (gunicorn writes a line per request when it is answered)."""
        lines: list[str] = []
        for path in self.paths:
            if not path.exists():
                continue
            with open(path, "rb") as fh:
                fh.seek(self.offsets.get(path, 0))
                lines += fh.read().decode(errors="replace").splitlines()
        return count_requests(lines)
