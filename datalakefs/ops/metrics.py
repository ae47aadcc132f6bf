"""The optional Prometheus endpoint: ``GET /metrics`` on ``<metrics_address>:<metrics_port>``.

The metrics come from the daemon's status (the same dict as ``.datalakefs/status.json``), rendered by
``prometheus_client`` in its text format, every family with a ``# HELP`` line and the label
``mountpoint``:

* what only grows is a **counter** (``datalakefs_content_bytes_fetched_total``,
  ``datalakefs_catalogue_calls_total{method="list_content"}``, ...): Prometheus computes rates itself,
  so the status's own rates (``rates``, ``hit_rate``) are not exported;
* per-method and per-event numbers are one family with a label (``method``, ``event``, ``state``),
  not one family per key;
* every other number of the status is a **gauge** named after its path
  (``datalakefs_<section>_<key>``, characters outside ``[a-zA-Z0-9_]`` become ``_``), so sections that
  services add later appear without a change here; strings, lists and nulls are left out;
* the process's own metrics (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, open
  file descriptors, ...) and ``python_info``.

The server is a few lines of trio: one request per connection, a request line and headers of at most
8 KiB read within 5 s, anything but ``GET /metrics`` answered 404. It listens on ``metrics_address``
(loopback by default; a pod's scraper needs ``0.0.0.0``). ``metrics_port = 0`` picks a free port (the
status file says which, under ``metrics.url``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from datalakefs.errors import ConfigError
from datalakefs.redaction import redact_text

StatusFn = Callable[[], Mapping[str, Any]]
Path = tuple[str, ...]
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
_MAX_REQUEST = 8192
_READ_TIMEOUT = 5.0

#: numbers that only grow, and what they count
COUNTERS: Mapping[Path, str] = {
    ("content", "requests"): "Range requests sent to storage",
    ("content", "failed_requests"): "Range requests to storage that failed",
    ("content", "piece_requests"): "Small range requests of single pieces",
    ("content", "bytes_fetched"): "Bytes fetched from storage",
    ("content", "hits"): "Reads served from the block cache",
    ("content", "misses"): "Reads that needed bytes from storage",
    ("content", "bypassed_blocks"): "Blocks read without going through the cache",
    ("content", "disk_reads"): "Block reads answered from the cache's data file rather than from memory",
    ("content", "verified_files"): "Files whose whole-file checksum was verified",
    ("content", "cache", "evictions"): "Blocks evicted from the cache",
    ("content", "cache", "evicted_bytes"): "Bytes evicted from the cache",
    ("content", "cache", "corrupt_blocks"): "Cached blocks dropped because their checksum was wrong",
    ("content", "cache", "checksum_mismatches"): "Files whose whole-file checksum did not match the catalogue",
    ("catalogue", "hits"): "Catalogue answers served from the TTL cache",
    ("catalogue", "misses"): "Catalogue lookups that called the server",
    ("catalogue", "negative_hits"): "Lookups answered 'no such name' from the negative cache",
    ("catalogue", "shared"): "Catalogue calls that joined an identical call already in flight",
    ("listing", "entries_while_streaming"): "Directory entries made ready for readdir before their listing ended",
    ("outbox", "uploaded"): "Files uploaded from the outbox",
    ("outbox", "uploaded_while_writing"): "Files whose upload ran while they were written",
    ("storage_auth", "token_reads"): "Reads of the storage token file",
}
#: maps of name -> count that become one family with a label: (family, label, help, is a counter)
LABELLED: Mapping[Path, tuple[str, str, str, bool]] = {
    ("catalogue", "calls"): ("datalakefs_catalogue_calls", "method", "Catalogue calls by method", True),
    ("catalogue", "errors"): ("datalakefs_catalogue_errors", "method", "Failed catalogue calls by method", True),
    ("staging", "counters"): ("datalakefs_staging_events", "event",
                              "Staging events (rules created, reused, found; polls; replica checks)", True),
    ("staging", "reads"): ("datalakefs_staging_reads", "kind", "Opens and bytes of staged reads by kind", True),
}
#: outbox files by state: one gauge family, label ``state``
OUTBOX_STATES = ("writing", "queued", "uploading", "failed")
GAUGE_HELP: Mapping[Path, str] = {
    ("uptime_s",): "Seconds since the mount started",
    ("content", "cache", "used_bytes"): "Bytes held in the block cache",
    ("content", "cache", "capacity"): "Size limit of the block cache in bytes",
    ("content", "cache", "files"): "Files with blocks in the cache",
    ("content", "cache", "blocks"): "Blocks in the cache",
    ("content", "transfers_in_flight"): "Range requests to storage in flight",
    ("catalogue", "in_flight"): "Catalogue calls in flight",
    ("catalogue", "streaming"): "Listings whose catalogue answer is still arriving",
    ("catalogue", "cached_entries"): "Entries in the catalogue's TTL caches",
    ("outbox", "pending_bytes"): "Bytes in the outbox not uploaded yet",
    ("staging", "files_tracked"): "Files whose staging the daemon follows",
    ("staging", "files_staged"): "Followed files that are staged",
}
#: derived or identifying numbers that are not metrics
SKIPPED: frozenset[Path] = frozenset({("pid",), ("rates",), ("content", "hit_rate"), ("metrics",)})


class StatusCollector(Collector):
    """The daemon's status as metric families (see the module docstring)."""

    def __init__(self, status: StatusFn) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        labels = {"mountpoint": str(status.get("mountpoint", ""))}
        outbox = status.get("outbox")
        if isinstance(outbox, Mapping):
            files = GaugeMetricFamily("datalakefs_outbox_files", "Files in the outbox by state",
                                      labels=[*labels, "state"])
            for state in OUTBOX_STATES:
                if _number(outbox.get(state)) is not None:
                    files.add_metric([*labels.values(), state], float(outbox[state]))
            yield files
        for path, value in _numbers((), status):
            if path in SKIPPED or path[:1] in SKIPPED or (path[0] == "outbox" and path[-1] in OUTBOX_STATES):
                continue
            labelled = LABELLED.get(path[:-1])
            if labelled is not None:
                continue  # collected below, one family per map
            name = "datalakefs_" + "_".join(_UNSAFE.sub("_", part) for part in path)
            family: CounterMetricFamily | GaugeMetricFamily
            if path in COUNTERS:
                family = CounterMetricFamily(name, COUNTERS[path], labels=list(labels))
            else:
                family = GaugeMetricFamily(name, GAUGE_HELP.get(path, f"status.json {'.'.join(path)}"),
                                           labels=list(labels))
            family.add_metric(list(labels.values()), value)
            yield family
        for path, (name, label, text, is_counter) in LABELLED.items():
            counts = _section(status, path)
            if counts is None:
                continue
            kind = CounterMetricFamily if is_counter else GaugeMetricFamily
            labelled_family = kind(name, text, labels=[*labels, label])
            for key, count in sorted(counts.items()):
                number = _number(count)
                if number is not None:
                    labelled_family.add_metric([*labels.values(), str(key)], number)
            yield labelled_family


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None  # bool is an int: 0/1


def _numbers(prefix: Path, value: Any) -> Iterator[tuple[Path, float]]:
    number = _number(value)
    if number is not None:
        yield prefix, number
    elif isinstance(value, Mapping):
        for key, inner in sorted(value.items()):
            yield from _numbers((*prefix, str(key)), inner)


def _section(status: Mapping[str, Any], path: Path) -> Mapping[str, Any] | None:
    value: Any = status
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, Mapping) else None


def registry_for(status: StatusFn) -> CollectorRegistry:
    """A registry with the status collector and the process and platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of everything in ``registry``, credentials scrubbed."""
    return redact_text(generate_latest(registry).decode()).encode()


async def _handle(stream: trio.abc.Stream, registry: CollectorRegistry) -> None:
    async with stream:
        request = b""
        with trio.move_on_after(_READ_TIMEOUT):
            while b"\r\n\r\n" not in request and len(request) < _MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                request += chunk
        parts = request.split(b"\r\n", 1)[0].split()
        if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
            code, content_type, body = "200 OK", CONTENT_TYPE_LATEST, exposition(registry)
        else:
            code, content_type, body = "404 Not Found", "text/plain", b"datalakefs: only GET /metrics is served\n"
        head = (
            f"HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(head.encode() + body)


class MetricsEndpoint:
    """The listening socket, opened before the daemon's services start (so a busy port stops the mount
    with a clear :class:`ConfigError`), and its serving loop."""

    def __init__(self, listeners: list[trio.SocketListener], address: str) -> None:
        self._listeners = listeners
        self.port: int = listeners[0].socket.getsockname()[1]
        host = f"[{address}]" if ":" in address else address
        self.url = f"http://{host}:{self.port}/metrics"

    @classmethod
    async def open(cls, port: int, address: str = "127.0.0.1") -> MetricsEndpoint:
        try:
            return cls(await trio.open_tcp_listeners(port, host=address), address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"option metrics_port: cannot listen on {address}:{port}: {reason}") from None

    async def serve(self, status: StatusFn) -> None:
        """Answer requests until cancelled."""
        registry = registry_for(status)

        async def handler(stream: trio.SocketStream) -> None:
            await _handle(stream, registry)

        try:
            async with trio.open_nursery() as nursery:
                await trio.serve_listeners(handler, self._listeners, handler_nursery=nursery)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        for listener in self._listeners:
            await listener.aclose()
