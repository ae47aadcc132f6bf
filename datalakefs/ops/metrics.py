"""The optional Prometheus endpoint: ``GET /metrics`` on ``127.0.0.1:<metrics_port>``.

Every number of the daemon's status (the same dict as ``.datalakefs/status.json``) becomes one sample
named after its path, ``datalakefs_<section>_<key>`` (characters outside ``[a-zA-Z0-9_]`` become ``_``),
with the label ``mountpoint``; booleans are 0/1, strings and nulls are left out. Sections that other
services add to the status appear without any change here. All samples are typed ``gauge`` (several
are counters that only grow; Prometheus' ``rate()`` works on either).

The server is a few lines of trio: one request per connection, a request line and headers of at most
8 KiB read within 5 s, anything but ``GET /metrics`` answered 404. It listens on loopback only.
``metrics_port = 0`` picks a free port (the status file says which, under ``metrics.url``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import trio

from datalakefs.errors import ConfigError
from datalakefs.redaction import redact_text

StatusFn = Callable[[], Mapping[str, Any]]
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
_MAX_REQUEST = 8192
_READ_TIMEOUT = 5.0


def _samples(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, int | float):  # bool is an int: 0/1
        yield prefix, float(value)
    elif isinstance(value, Mapping):
        for key, inner in sorted(value.items()):
            yield from _samples(f"{prefix}_{_UNSAFE.sub('_', str(key))}", inner)


def exposition(status: Mapping[str, Any]) -> str:
    """The Prometheus text format (version 0.0.4) of ``status``."""
    mountpoint = str(status.get("mountpoint", "")).replace("\\", "\\\\").replace('"', '\\"')
    lines = []
    for name, value in _samples("datalakefs", {k: v for k, v in status.items() if k != "pid"}):
        lines.append(f"# TYPE {name} gauge")
        lines.append(f'{name}{{mountpoint="{mountpoint}"}} {value:.17g}')
    return redact_text("\n".join(lines) + "\n")


async def _handle(stream: trio.abc.Stream, status: StatusFn) -> None:
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
            code, content_type, body = "200 OK", "text/plain; version=0.0.4", exposition(status()).encode()
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

    def __init__(self, listeners: list[trio.SocketListener]) -> None:
        self._listeners = listeners
        self.port: int = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"

    @classmethod
    async def open(cls, port: int) -> MetricsEndpoint:
        try:
            return cls(await trio.open_tcp_listeners(port, host="127.0.0.1"))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"option metrics_port: cannot listen on 127.0.0.1:{port}: {reason}") from None

    async def serve(self, status: StatusFn) -> None:
        """Answer requests until cancelled."""

        async def handler(stream: trio.SocketStream) -> None:
            await _handle(stream, status)

        try:
            async with trio.open_nursery() as nursery:
                await trio.serve_listeners(handler, self._listeners, handler_nursery=nursery)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        for listener in self._listeners:
            await listener.aclose()
