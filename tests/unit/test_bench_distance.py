"""The bench's RTT settings and the rucio.cfg copy that sends a mount's catalogue calls through a proxy."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from bench.distance import proxied_rucio_config, rtts_ms
from bench.env import BenchError


def test_rtts_come_from_bench_rtt_ms_and_default_to_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_RTT_MS", raising=False)
    assert rtts_ms() == [0.0]
    monkeypatch.setenv("BENCH_RTT_MS", "0, 30")
    assert rtts_ms() == [0.0, 30.0]


@pytest.mark.parametrize("value", ["-5", ",", "thirty"])
def test_bad_rtts_are_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("BENCH_RTT_MS", value)
    with pytest.raises((BenchError, ValueError)):
        rtts_ms()


def test_the_copy_points_catalogue_and_auth_at_the_proxy_and_keeps_the_rest(tmp_path: Path) -> None:
    source = tmp_path / "rucio.cfg"
    source.write_text("[client]\nrucio_host = http://127.0.0.1:44000\nauth_host = http://127.0.0.1:44000\n"
                      "auth_type = userpass\npassword = a%b\n")
    copy = proxied_rucio_config(source, "http://127.0.0.1:45555", tmp_path / "proxied.cfg")
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(copy)
    assert dict(parser["client"]) == {"rucio_host": "http://127.0.0.1:45555", "auth_host": "http://127.0.0.1:45555",
                                      "auth_type": "userpass", "password": "a%b"}
