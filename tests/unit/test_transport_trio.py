"""Range GETs on the trio thread against the fault-injecting origin: the same contract as aiohttp's."""

from __future__ import annotations

import socket

import pytest
import trio

from datalakefs.transport.deadlines import Deadline
from datalakefs.transport.http import FailureKind, RangeReadError
from datalakefs.transport.trio_http import TrioRangeClient
from tests.faults.origin import FAULT_KINDS, FaultyOrigin
from tests.unit.test_transport_http import DATA, Auth, Sink, origin


@pytest.mark.parametrize(("start", "length"), [(0, len(DATA)), (0, 1), (12345, 1 << 20), (len(DATA) - 5, 5)])
async def test_closed_range_is_written_at_its_offsets(start: int, length: int) -> None:
    client = TrioRangeClient()
    with origin() as server:
        sink = Sink(start)
        await client.fetch(server.url("f"), start, length, len(DATA), sink)
        await client.aclose()
    assert bytes(sink.data) == DATA[start : start + length]
    assert sink.closed == 1
    assert server.gets() == {f"bytes={start}-{start + length - 1}": 1}
    assert server.violations == []


@pytest.mark.parametrize(("fault", "kinds"), FAULT_KINDS)
async def test_each_fault_is_an_error_not_data(fault: str, kinds: set[FailureKind]) -> None:
    client = TrioRangeClient(stall_timeout=0.3)
    with origin(fault_rate=1.0, faults=[fault], stall=5.0) as server:
        sink = Sink(1000)
        with pytest.raises(RangeReadError) as caught:
            await client.fetch(server.url("f"), 1000, 1 << 20, len(DATA), sink)
        await client.aclose()
    assert caught.value.kind in kinds
    assert caught.value.kind.retryable
    assert sink.closed == 1
    assert bytes(sink.data) == DATA[1000 : 1000 + len(sink.data)]  # a prefix at most, never wrong bytes


@pytest.mark.parametrize(
    ("status", "kind"), [(401, FailureKind.DENIED), (403, FailureKind.DENIED), (404, FailureKind.NOT_FOUND)]
)
async def test_refusals_are_not_retryable(status: int, kind: FailureKind) -> None:
    with origin(deny={"f": status}) as server, pytest.raises(RangeReadError) as caught:
        await TrioRangeClient().fetch(server.url("f"), 0, 10, len(DATA), Sink(0))
    assert caught.value.kind is kind
    assert not caught.value.kind.retryable


async def test_wrong_total_size_is_rejected() -> None:
    with origin() as server, pytest.raises(RangeReadError) as caught:
        await TrioRangeClient().fetch(server.url("f"), 0, 10, len(DATA) + 1, Sink(0))
    assert caught.value.kind is FailureKind.BAD_REPLY


@pytest.mark.parametrize(("start", "length", "total"), [(-1, 5, 15), (0, 0, 15), (10, 6, 15), (15, 1, 15)])
async def test_only_closed_in_bounds_ranges_reach_the_wire(start: int, length: int, total: int) -> None:
    with origin() as server:
        sink = Sink(start)
        with pytest.raises(ValueError, match="closed range"):
            await TrioRangeClient().fetch(server.url("small"), start, length, total, sink)
    assert server.requests == []
    assert sink.closed == 1


async def test_connection_refused_is_a_connection_failure() -> None:
    with origin() as server:
        url = server.url("f")
    with pytest.raises(RangeReadError) as caught:
        await TrioRangeClient(connect_timeout=2).fetch(url, 0, 10, len(DATA), Sink(0))
    assert caught.value.kind is FailureKind.CONNECTION


async def test_keep_alive_headers_and_recovery_from_a_connection_the_server_closed() -> None:
    client = TrioRangeClient(auth=Auth("secret-token"))
    with origin() as server:
        for i in range(50):
            sink = Sink(i * 1000)
            await client.fetch(server.url("f"), i * 1000, 1000, len(DATA), sink)
            assert bytes(sink.data) == DATA[i * 1000 : i * 1000 + 1000]
        assert server.connections == 1  # one pooled connection served every request
        server.drop_connections()  # the pooled connection is now closed at the server's end
        await trio.sleep(0.1)
        sink = Sink(0)
        await client.fetch(server.url("f"), 0, 100, len(DATA), sink)
        assert bytes(sink.data) == DATA[:100]
        assert server.connections == 2
        await client.aclose()
    assert all(r.headers.get("Authorization") == "Bearer secret-token" for r in server.requests)
    assert all(r.headers.get("Accept-Encoding") == "identity" for r in server.requests)


def test_only_plain_http_without_credentials_is_taken() -> None:
    assert TrioRangeClient.supports("http://127.0.0.1:1/a?b=c")
    assert not TrioRangeClient.supports("https://127.0.0.1:1/a")
    assert not TrioRangeClient.supports("http://user:pw@127.0.0.1:1/a")
    assert not TrioRangeClient.supports("root://127.0.0.1:1//a")
    assert not TrioRangeClient.supports("http://127.0.0.1:port/a")  # aiohttp reports the bad URL


async def test_a_cancelled_transfer_leaves_no_connection_behind() -> None:
    client = TrioRangeClient()
    with FaultyOrigin({"f": DATA}, latency=5.0) as server:
        sink = Sink(0)
        with trio.move_on_after(0.2):
            await client.fetch(server.url("f"), 0, 10, len(DATA), sink)
        assert sink.closed == 1 and not sink.data
        sink = Sink(0)
        server.latency = 0.0
        await client.fetch(server.url("f"), 0, 10, len(DATA), sink)
        assert bytes(sink.data) == DATA[:10]
        await client.aclose()


async def test_a_refusal_renews_the_credentials_once_like_bulk_transfers() -> None:
    auth = Auth("expired-token", "new-token", "never-used")
    renewing, refused = TrioRangeClient(auth=auth), TrioRangeClient(auth=Auth("wrong-token-value"))
    with origin(bearer={"new-token"}) as server:
        sink = Sink(0)
        await renewing.fetch(server.url("f"), 0, 1000, len(DATA), sink)
        with pytest.raises(RangeReadError) as caught:
            await refused.fetch(server.url("f"), 0, 10, len(DATA), Sink(0))
        await renewing.aclose()
        await refused.aclose()
    assert bytes(sink.data) == DATA[:1000] and sink.closed == 1 and auth.renewed == 1
    assert [r.headers.get("Authorization") for r in server.requests[:2]] == ["Bearer expired-token",
                                                                              "Bearer new-token"]
    assert len(server.requests) == 3  # the refused client did not repeat its request
    assert caught.value.kind is FailureKind.DENIED and "wrong-token-value" not in str(caught.value)


async def test_a_trickling_server_is_abandoned_at_the_deadline_and_the_next_piece_proceeds() -> None:
    client = TrioRangeClient(stall_timeout=5.0, deadline=Deadline(base=0.5, min_rate=1 << 20))
    with origin(fault_rate=1.0, faults=["trickle"], trickle=0.05) as slow, origin() as good:
        sink = Sink(0)
        with pytest.raises(RangeReadError, match="minimum rate") as caught:
            await client.fetch(slow.url("f"), 0, 1024, len(DATA), sink)
        assert caught.value.kind is FailureKind.TIMEOUT
        assert sink.closed == 1 and bytes(sink.data) == DATA[: len(sink.data)]
        after = Sink(0)
        await client.fetch(good.url("f"), 0, 1024, len(DATA), after)
        await client.aclose()
    assert bytes(after.data) == DATA[:1024]


async def test_the_stall_timeout_counts_from_each_wait_not_from_the_start_of_the_fetch() -> None:
    """A body that keeps coming, a byte every 0.05 s, for longer in all than the stall timeout, is read:
    only a wait with no byte for the stall timeout ends a fetch (the fetch's one cancel scope gets a new
    deadline at each wait)."""
    client = TrioRangeClient(stall_timeout=0.3)
    with origin(fault_rate=1.0, faults=["trickle"], trickle=0.05) as slow:
        sink = Sink(0)
        await client.fetch(slow.url("f"), 0, 12, len(DATA), sink)  # 12 bytes: 0.6 s, two stall timeouts
        await client.aclose()
    assert bytes(sink.data) == DATA[:12] and sink.closed == 1


class _Rounds(trio.abc.Instrument):
    """Counts the passes of the trio scheduler (each one waits for I/O: an ``epoll_wait``)."""

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


class _CannedServer:
    """One connection; answers a request with ``reply`` when the test says so (``answer``), so the reply
    can be waiting in the client's socket before the client even sends its request."""

    def __init__(self, reply: bytes) -> None:
        self._reply = reply
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/f"
        self._connection: socket.socket | None = None
        self.requests = 0

    def answer(self) -> None:
        """Accept the connection if need be, send one reply (blocking; in a thread)."""
        if self._connection is None:
            self._connection, _ = self._listener.accept()
        self._connection.sendall(self._reply)

    def read_request(self) -> None:
        assert self._connection is not None
        received = b""
        while b"\r\n\r\n" not in received:
            received += self._connection.recv(4096)
        self.requests += 1

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._listener.close()


async def test_a_reply_already_there_costs_no_pass_of_the_scheduler() -> None:
    body = DATA[:4096]
    reply = (b"HTTP/1.1 206 Partial Content\r\nContent-Length: 4096\r\n"
             + f"Content-Range: bytes 0-4095/{len(DATA)}\r\n\r\n".encode() + body)
    server = _CannedServer(reply)
    client = TrioRangeClient()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, server.answer)
            sink = Sink(0)
            await client.fetch(server.url, 0, 4096, len(DATA), sink)  # opens the pooled connection
        await trio.to_thread.run_sync(server.read_request)
        await trio.to_thread.run_sync(server.answer)  # the next reply is on its way before the request
        rounds = _Rounds()
        trio.lowlevel.add_instrument(rounds)
        try:
            again = Sink(0)
            await client.fetch(server.url, 0, 4096, len(DATA), again)
        finally:
            trio.lowlevel.remove_instrument(rounds)
        await trio.to_thread.run_sync(server.read_request)
        await client.aclose()
    finally:
        server.close()
    assert bytes(sink.data) == bytes(again.data) == body and server.requests == 2
    assert rounds.count == 0
