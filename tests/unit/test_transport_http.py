"""Closed-range GETs against the fault-injecting origin: every bad reply is an error, never data."""

from __future__ import annotations

import concurrent.futures
import random
import time
from collections.abc import Mapping

import pytest
import trio
from aiohttp.streams import StreamReader

from datalakefs.transport.aio_bridge import AioBridge
from datalakefs.transport.deadlines import Deadline
from datalakefs.transport.http import FailureKind, HttpTransport, NoAuth, RangeReadError, redact_url
from tests.faults.origin import FAULT_KINDS, FaultyOrigin

DATA = random.Random(7).randbytes(3 * 1024 * 1024 + 17)


class Sink:
    """Collects what a transfer writes, checking the sink contract as it goes."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.data = bytearray()
        self.closed = 0

    def write(self, offset: int, data: bytes) -> None:
        assert not self.closed
        assert offset == self.start + len(self.data)
        self.data += data

    def close(self) -> None:
        self.closed += 1


def origin(**options: object) -> FaultyOrigin:
    return FaultyOrigin({"f": DATA, "small": b"0123456789abcde"}, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("start", "length"), [(0, len(DATA)), (0, 1), (12345, 1 << 20), (len(DATA) - 5, 5)])
async def test_closed_range_is_written_at_its_offsets(bridge: AioBridge, start: int, length: int) -> None:
    with origin() as server:
        sink = Sink(start)
        await HttpTransport(bridge).fetch(server.url("f"), start, length, len(DATA), sink)
    assert bytes(sink.data) == DATA[start : start + length]
    assert sink.closed == 1
    assert server.gets() == {f"bytes={start}-{start + length - 1}": 1}
    assert server.violations == []


@pytest.mark.parametrize(("fault", "kinds"), FAULT_KINDS)
async def test_each_fault_is_an_error_not_data(bridge: AioBridge, fault: str, kinds: set[FailureKind]) -> None:
    with origin(fault_rate=1.0, faults=[fault], stall=5.0) as server:
        sink = Sink(1000)
        transport = HttpTransport(bridge, stall_timeout=0.3)
        with pytest.raises(RangeReadError) as caught:
            await transport.fetch(server.url("f"), 1000, 1 << 20, len(DATA), sink)
    assert caught.value.kind in kinds
    assert caught.value.kind.retryable
    assert sink.closed == 1
    assert bytes(sink.data) == DATA[1000 : 1000 + len(sink.data)]  # a prefix at most, never wrong bytes


@pytest.mark.parametrize(
    ("status", "kind"), [(401, FailureKind.DENIED), (403, FailureKind.DENIED), (404, FailureKind.NOT_FOUND)]
)
async def test_refusals_are_not_retryable(bridge: AioBridge, status: int, kind: FailureKind) -> None:
    with origin(deny={"f": status}) as server, pytest.raises(RangeReadError) as caught:
        await HttpTransport(bridge).fetch(server.url("f"), 0, 10, len(DATA), Sink(0))
    assert caught.value.kind is kind
    assert not caught.value.kind.retryable


async def test_wrong_total_size_is_rejected(bridge: AioBridge) -> None:
    with origin() as server, pytest.raises(RangeReadError) as caught:
        await HttpTransport(bridge).fetch(server.url("f"), 0, 10, len(DATA) + 1, Sink(0))
    assert caught.value.kind is FailureKind.BAD_REPLY


@pytest.mark.parametrize(("start", "length", "total"), [(-1, 5, 15), (0, 0, 15), (10, 6, 15), (15, 1, 15)])
async def test_only_closed_in_bounds_ranges_reach_the_wire(
    bridge: AioBridge, start: int, length: int, total: int
) -> None:
    with origin() as server:
        sink = Sink(start)
        with pytest.raises(ValueError, match="closed range"):
            await HttpTransport(bridge).fetch(server.url("small"), start, length, total, sink)
    assert server.requests == []
    assert sink.closed == 1


async def test_connection_refused_is_a_connection_failure(bridge: AioBridge) -> None:
    with origin() as server:
        url = server.url("f")
    with pytest.raises(RangeReadError) as caught:
        await HttpTransport(bridge, connect_timeout=2).fetch(url, 0, 10, len(DATA), Sink(0))
    assert caught.value.kind is FailureKind.CONNECTION


class Auth(NoAuth):
    """Bearer ``tokens[0]``; ``renew`` moves on to the next token, if any."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.asked: list[str] = []
        self.renewed = 0

    def headers(self, url: str) -> Mapping[str, str]:
        self.asked.append(url)
        return {"Authorization": f"Bearer {self.tokens[0]}"}

    def renew(self) -> bool:
        self.renewed += 1
        if len(self.tokens) > 1:
            self.tokens.pop(0)
            return True
        return False


async def test_headers_provider_is_asked_per_request_and_ranges_keep_alive(bridge: AioBridge) -> None:
    auth = Auth("secret-token")
    asked = auth.asked
    with origin() as server:
        transport = HttpTransport(bridge, auth=auth)
        for i in range(50):
            await transport.fetch(server.url("f"), i * 1000, 1000, len(DATA), Sink(i * 1000))
    assert len(asked) == 50
    assert all(r.headers.get("Authorization") == "Bearer secret-token" for r in server.requests)
    assert all(r.headers.get("Accept-Encoding") == "identity" for r in server.requests)
    assert server.connections == 1  # keep-alive: one pooled connection served every request


async def test_error_messages_never_show_query_or_user_info(bridge: AioBridge) -> None:
    with origin(deny={"f": 403}) as server:
        url = server.url("f").replace("http://", "http://user:pw@") + "?authz=Bearer%20secret"
        with pytest.raises(RangeReadError) as caught:
            await HttpTransport(bridge).fetch(url, 0, 10, len(DATA), Sink(0))
    assert "secret" not in str(caught.value) and "pw" not in str(caught.value)
    assert redact_url("https://u:p@h:1/a/b?x=1#f") == "https://h:1/a/b"


async def test_a_refusal_renews_the_token_once_and_repeats_the_request(bridge: AioBridge) -> None:
    with origin(bearer={"new-token"}) as server:
        auth = Auth("expired-token", "new-token")
        transport = HttpTransport(bridge, auth=auth)
        sink = Sink(0)
        await transport.fetch(server.url("f"), 0, 1000, len(DATA), sink)
    assert bytes(sink.data) == DATA[:1000] and sink.closed == 1
    assert auth.renewed == 1 and transport.renewals == 1
    assert [r.headers.get("Authorization") for r in server.requests] == ["Bearer expired-token", "Bearer new-token"]


async def test_a_refusal_without_new_credentials_is_not_repeated(bridge: AioBridge) -> None:
    with origin(bearer={"valid-token"}) as server:
        auth = Auth("wrong-token-value")
        transport = HttpTransport(bridge, auth=auth)
        with pytest.raises(RangeReadError) as caught:
            await transport.fetch(server.url("f"), 0, 1000, len(DATA), Sink(0))
    assert caught.value.kind is FailureKind.DENIED
    assert auth.renewed == 1 and transport.renewals == 0 and len(server.requests) == 1
    assert "wrong-token-value" not in str(caught.value)


async def test_a_trickling_server_is_abandoned_at_the_deadline_and_the_next_transfer_proceeds(
    bridge: AioBridge,
) -> None:
    """A byte every 50 ms never trips the stall timeout; the deadline (0.5 s + 1 KiB at 1 MiB/s) does."""
    transport = HttpTransport(bridge, stall_timeout=5.0, deadline=Deadline(base=0.5, min_rate=1 << 20))
    with origin(fault_rate=1.0, faults=["trickle"], trickle=0.05) as slow, origin() as good:
        sink = Sink(0)
        with pytest.raises(RangeReadError, match="minimum rate") as caught:
            await transport.fetch(slow.url("f"), 0, 1024, len(DATA), sink)
        assert caught.value.kind is FailureKind.TIMEOUT and caught.value.kind.retryable
        assert sink.closed == 1 and bytes(sink.data) == DATA[: len(sink.data)]
        after = Sink(0)
        await transport.fetch(good.url("f"), 0, 1024, len(DATA), after)
    assert bytes(after.data) == DATA[:1024]


async def test_through_aiohttp_each_received_chunk_reaches_the_sink_without_being_joined_to_others(
    bridge: AioBridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[int] = []
    feed_data = StreamReader.feed_data

    def recording_feed_data(self: StreamReader, data: bytes, size: int = 0) -> bool:
        received.append(len(data))
        return feed_data(self, data, size)

    monkeypatch.setattr(StreamReader, "feed_data", recording_feed_data)

    class SlowFirstWrite(Sink):
        """A sink busy at its first write, so that the next chunks wait in the connection's buffer."""

        def __init__(self, start: int) -> None:
            super().__init__(start)
            self.writes: list[int] = []

        def write(self, offset: int, data: bytes) -> None:
            if not self.data:
                time.sleep(0.2)  # a slow consumer, not a synchronisation: the chunks pile up behind it
            super().write(offset, data)
            self.writes.append(len(data))

    with origin(redirect={"moved": "f"}) as server:  # a redirect: aiohttp's path, which follows it
        sink = SlowFirstWrite(0)
        await HttpTransport(bridge).fetch(server.url("moved"), 0, len(DATA), len(DATA), sink)
    assert bytes(sink.data) == DATA
    assert sink.writes == received  # one write per chunk received, none joined


class DrainingSink(Sink):
    """A sink whose ``close`` leaves work to another thread (as the cache writer's disk writes), done
    when the test says."""

    def __init__(self, start: int) -> None:
        super().__init__(start)
        self.drained: concurrent.futures.Future[None] = concurrent.futures.Future()


async def test_a_transfer_returns_once_its_sink_drained_and_the_loop_serves_others_meanwhile(
    bridge: AioBridge,
) -> None:
    with origin() as server:
        transport = HttpTransport(bridge)
        draining = DrainingSink(0)
        returned = trio.Event()

        async def fetch_draining() -> None:
            await transport.fetch(server.url("f"), 0, 1 << 20, len(DATA), draining)
            returned.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_draining)
            with trio.fail_after(10):
                while not draining.closed:  # noqa: ASYNC110
                    await trio.sleep(0.01)  # no event to wait on: close runs on the loop thread
            other = Sink(5)
            await transport.fetch(server.url("f"), 5, 10, len(DATA), other)  # the loop is not held up
            assert bytes(other.data) == DATA[5:15]
            assert not returned.is_set()  # the first transfer waits for its sink's last work ...
            draining.drained.set_result(None)
        assert returned.is_set()  # ... and returns once it is done
    assert bytes(draining.data) == DATA[: 1 << 20]
    assert draining.closed == 1
