"""Status rendering, rates, the Prometheus exposition and server, and progress bars."""

from __future__ import annotations

import io
from typing import Any

import pytest
import trio

from datalakefs.cli.progress import Progress, human_bytes, human_duration
from datalakefs.cli.status import render_mount
from datalakefs.errors import ConfigError
from datalakefs.ops.metrics import MetricsEndpoint, exposition, registry_for
from datalakefs.ops.rates import RateMeter

STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "mountpoint": "/lake",
    "pid": 42,
    "uptime_s": 3725.0,
    "rates": {"bytes_fetched_per_s": 10 * 1024 * 1024, "requests_per_s": 2.5},
    "content": {
        "cache": {"used_bytes": 1 << 30, "capacity": 4 << 30, "files": 3},
        "hit_rate": 0.875,
        "transfers_in_flight": 2,
        "requests": 120,
        "failed_requests": 1,
        "bytes_fetched": 5 << 20,
    },
    "catalogue": {"calls": {"list_scopes": 3, "get_info": 4}, "hits": 10, "misses": 7, "last_error": None},
    "storage_auth": {"bearer_token": "/run/user/1000/bt_u1000", "token_reads": 3, "x509_proxy": None},
    "metrics": {"url": None},
}


def test_table_summarises_known_sections() -> None:
    text = "\n".join(render_mount({"mountpoint": "/lake", "pid": 42, "status": STATUS}))
    assert text.splitlines()[0] == "/lake  pid 42  up 1h 2m  datalakefs 0.1.0"
    assert "1.0 GiB of 4.0 GiB (25%), 3 files, hit rate 87.5%" in text
    assert "2 in flight, 10.0 MiB/s, 2.5 requests/s; 120 requests, 1 failed, 5.0 MiB" in text
    assert "7 calls, 10 hits, 7 misses" in text
    assert "bearer token /run/user/1000/bt_u1000" in text


def test_unknown_sections_are_rendered_generically_and_odd_values_never_fail() -> None:
    status = {
        **STATUS,
        "staging": {"rules": [{"id": "abc", "state": "REPLICATING", "files": {"done": 3, "total": 9}}], "active": 1},
        "outbox": {"queued": 4, "bytes_queued": 100, "queue": [{"path": f"f{i}", "state": "wait"} for i in range(12)]},
        "content": "not a mapping",
        "catalogue": {"calls": "odd"},
        "extra_list": [1, None, True],
        "extra_scalar": None,
    }
    text = "\n".join(render_mount({"mountpoint": "/lake", "status": status}))
    assert "staging" in text and "active 1" in text and "id=abc  state=REPLICATING  files.done=3  files.total=9" in text
    assert "outbox" in text and "queued 4" in text and "queue: 12" in text and "... and 2 more" in text
    assert "  extra list    3 entries" in text and "  extra scalar  -" in text
    assert "  cache" not in text and "  transfers" not in text  # content was not a mapping


def test_a_mount_that_does_not_answer_is_reported() -> None:
    lines = render_mount({"mountpoint": "/lake", "pid": 7, "error": "the daemon did not answer within 5 s"})
    assert lines == ["/lake  pid 7  NOT ANSWERING: the daemon did not answer within 5 s"]


def test_rates_over_the_window() -> None:
    counter = {"bytes_fetched": 0.0}
    meter = RateMeter(lambda: counter, window=4, interval=1)
    assert meter.rates() == {"bytes_fetched": 0.0}
    for t in range(10):
        counter["bytes_fetched"] = 100.0 * t
        meter.sample(float(t))
    assert meter.rates() == {"bytes_fetched": 100.0}


def _exposed(status: dict[str, Any]) -> list[str]:
    return exposition(registry_for(lambda: status)).decode().splitlines()


def test_exposition_has_help_counters_labels_and_process_metrics() -> None:
    lines = _exposed({**STATUS, "outbox": {"queued": 4, "uploaded": 9, "state": "ok", "paused": False},
                      "staging": {"counters": {"rules_created": 2}}})
    mp = 'mountpoint="/lake"'
    assert f"datalakefs_content_cache_used_bytes{{{mp}}} 1.073741824e+09" in lines
    assert "# HELP datalakefs_content_cache_used_bytes Bytes held in the block cache" in lines
    # what only grows is a counter; per-method and per-event numbers are labels of one family
    assert "# TYPE datalakefs_content_bytes_fetched_total counter" in lines
    assert f"datalakefs_content_bytes_fetched_total{{{mp}}} 5.24288e+06" in lines
    assert f'datalakefs_catalogue_calls_total{{method="list_scopes",{mp}}} 3.0' in lines
    assert f'datalakefs_staging_events_total{{event="rules_created",{mp}}} 2.0' in lines
    assert f'datalakefs_outbox_files{{{mp},state="queued"}} 4.0' in lines
    assert f"datalakefs_outbox_uploaded_total{{{mp}}} 9.0" in lines
    assert f"datalakefs_outbox_paused{{{mp}}} 0.0" in lines
    # every family has a HELP line; rates and other derived numbers are left to Prometheus
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    helped = {line.split()[2] for line in lines if line.startswith("# HELP")}
    assert families == helped
    assert not any("rates" in line or "hit_rate" in line or "_pid" in line or "bearer" in line for line in lines)
    assert any(line.startswith("process_cpu_seconds_total ") for line in lines)
    assert any(line.startswith("python_info{") for line in lines)


async def _get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reply = b""
        while chunk := await stream.receive_some(65536):
            reply += chunk
    return reply


async def test_metrics_server_answers_get_metrics_only() -> None:
    endpoint = await MetricsEndpoint.open(0)
    assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.serve, lambda: STATUS)
        ok = await _get(endpoint.port, "/metrics")
        missing = await _get(endpoint.port, "/")
        nursery.cancel_scope.cancel()
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"datalakefs_content_bytes_fetched_total" in ok
    assert missing.startswith(b"HTTP/1.1 404")


async def test_the_metrics_address_is_where_it_listens() -> None:
    endpoint = await MetricsEndpoint.open(0, "127.0.0.2")
    assert endpoint.url == f"http://127.0.0.2:{endpoint.port}/metrics"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.serve, lambda: STATUS)
        stream = await trio.open_tcp_stream("127.0.0.2", endpoint.port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await stream.receive_some(64)).startswith(b"HTTP/1.1 200 OK")
        nursery.cancel_scope.cancel()


async def test_a_busy_metrics_port_is_a_config_error() -> None:
    busy = await MetricsEndpoint.open(0)
    try:
        with pytest.raises(ConfigError, match=f"option metrics_port: cannot listen on 127.0.0.1:{busy.port}"):
            await MetricsEndpoint.open(busy.port)
    finally:
        await busy.aclose()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    terminal, pipe = FakeTerminal(), io.StringIO()
    for stream in (terminal, pipe):
        with Progress("copy", total=4 << 20, stream=stream, interval=0) as bar:
            for _ in range(4):
                bar.advance(1 << 20)
    assert pipe.getvalue() == ""
    drawn = terminal.getvalue()
    assert drawn.endswith("\n") and drawn.count("\r") >= 5
    assert "copy [" + "#" * 24 + "] 100% 4.0 MiB/4.0 MiB" in drawn
    monkeypatch.setenv("TERM", "dumb")
    quiet = FakeTerminal()
    with Progress("x", stream=quiet):
        pass
    assert quiet.getvalue() == ""


def test_human_formats() -> None:
    assert human_bytes(0) == "0 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(3 << 40) == "3.0 TiB"
    assert human_duration(5) == "5s" and human_duration(65) == "1m 5s" and human_duration(90000) == "1d 1h"
