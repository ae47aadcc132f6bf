"""Counting a workload's catalogue requests in the demo Rucio server's gunicorn access logs."""

from __future__ import annotations

from pathlib import Path

from bench.rucio_log import RequestCount, RucioRequests, compare, count_requests

LIST = '127.0.0.1 - - [05/Dec/2026:06:40:00 +0000] "GET /dids/user.demo/ds/dids HTTP/1.1" 200 512 "-" "rucio"\n'
REPLICAS = '127.0.0.1 - - [05/Dec/2026:06:40:01 +0000] "POST /replicas/list HTTP/1.1" 200 9 "-" "rucio"\n'
TOKEN = '127.0.0.1 - - [05/Dec/2026:06:40:02 +0000] "GET /auth/userpass HTTP/1.1" 200 0 "-" "rucio"\n'


def test_requests_are_counted_with_token_requests_apart_and_other_lines_skipped() -> None:
    assert count_requests([LIST, REPLICAS, TOKEN, "[2026-12-05] [INFO] Booting worker\n"]) == RequestCount(2, 1)


def test_only_requests_logged_after_the_mark_count_in_both_logs(tmp_path: Path) -> None:
    plain, tls = tmp_path / "rucio-access.log", tmp_path / "rucio-tls-access.log"
    plain.write_text(LIST)
    requests = RucioRequests(tmp_path)
    requests.mark()
    with open(plain, "a") as fh:
        fh.write(REPLICAS)
    tls.write_text(LIST + TOKEN)  # created after the mark: all of it is new
    assert requests.count() == RequestCount(2, 1)


def test_compare_flags_a_mismatch_and_says_both_counts() -> None:
    assert compare(3, RequestCount(3, 1)).endswith(": match")
    line = compare(2, RequestCount(3, 0))
    assert "daemon 2" in line and "access log 3" in line and line.endswith("MISMATCH")
