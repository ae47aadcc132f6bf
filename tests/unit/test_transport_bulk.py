"""Bulk range GETs received into the sink's own memory (transport/bulk_http.py), through HttpTransport:
bytes land where the sink lends, every fault is an error and never data, connections are reused and
replaced, redirects fall back to aiohttp, and TLS works the same way."""

from __future__ import annotations

import random
import ssl
import subprocess
from pathlib import Path

import pytest
import trio

from datalakefs.cache.layout import FileKey
from datalakefs.cache.writer import ArrivedBlock, BlockWriter, LandedBlock
from datalakefs.model import DID, DIDInfo, DIDType
from datalakefs.transport.aio_bridge import AioBridge
from datalakefs.transport.http import FailureKind, HttpTransport, NoAuth, RangeReadError
from tests.faults.origin import FAULT_KINDS, FaultyOrigin

DATA = random.Random(11).randbytes(3 * 1024 * 1024 + 17)


class LendingSink:
    """A :class:`BufferSink` that lends a window of ``window`` bytes of its memory at a time (a block
    buffer's rest), checking the sink contract; counts what arrived by ``write`` (copied) instead."""

    def __init__(self, start: int, length: int, window: int = 100_000) -> None:
        self.start = start
        self.memory = bytearray(length)
        self.filled = 0
        self.window = window
        self.copied = 0
        self.closed = 0
        self._lent = 0

    @property
    def data(self) -> bytes:
        return bytes(self.memory[: self.filled])

    def receive_buffer(self, offset: int) -> memoryview | None:
        assert not self.closed and offset == self.start + self.filled
        window_end = (self.filled // self.window + 1) * self.window  # never across a window's end
        self._lent = min(window_end, len(self.memory)) - self.filled
        return memoryview(self.memory)[self.filled : self.filled + self._lent]

    def received(self, offset: int, count: int) -> None:
        assert not self.closed and offset == self.start + self.filled and 0 < count <= self._lent
        self.filled += count

    def write(self, offset: int, data: bytes | memoryview) -> None:
        assert not self.closed and offset == self.start + self.filled
        self.memory[self.filled : self.filled + len(data)] = data
        self.filled += len(data)
        self.copied += len(data)

    def close(self) -> None:
        self.closed += 1


def origin(**options: object) -> FaultyOrigin:
    return FaultyOrigin({"f": DATA}, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("start", "length"), [(0, len(DATA)), (5, 1), (12345, 1 << 20), (len(DATA) - 5, 5)])
async def test_the_body_is_received_into_the_lent_memory(bridge: AioBridge, start: int, length: int) -> None:
    with origin() as server:
        sink = LendingSink(start, length)
        await HttpTransport(bridge).fetch(server.url("f"), start, length, len(DATA), sink)
    assert sink.data == DATA[start : start + length] and sink.closed == 1
    assert sink.copied <= 16 << 10  # only the body bytes read together with the head are copied
    assert server.gets() == {f"bytes={start}-{start + length - 1}": 1}
    assert server.violations == []


@pytest.mark.parametrize(("fault", "kinds"), FAULT_KINDS)
async def test_each_fault_is_an_error_and_only_a_true_prefix_is_received(
    bridge: AioBridge, fault: str, kinds: set[FailureKind]
) -> None:
    with origin(fault_rate=1.0, faults=[fault], stall=5.0) as server, origin() as good:
        transport = HttpTransport(bridge, stall_timeout=0.3)
        sink = LendingSink(1000, 1 << 20)
        with pytest.raises(RangeReadError) as caught:
            await transport.fetch(server.url("f"), 1000, 1 << 20, len(DATA), sink)
        assert caught.value.kind in kinds and sink.closed == 1
        assert sink.data == DATA[1000 : 1000 + sink.filled]
        after = LendingSink(0, 1 << 20)  # the failed connection was not pooled: the next transfer is whole
        await transport.fetch(good.url("f"), 0, 1 << 20, len(DATA), after)
        assert after.data == DATA[: 1 << 20]


async def test_a_connection_the_server_closed_is_replaced_once(bridge: AioBridge) -> None:
    auth_free = HttpTransport(bridge)
    with origin() as server:
        for i in range(20):
            sink = LendingSink(i * 1000, 1000)
            await auth_free.fetch(server.url("f"), i * 1000, 1000, len(DATA), sink)
            assert sink.data == DATA[i * 1000 : i * 1000 + 1000]
        assert server.connections == 1  # kept alive
        server.drop_connections()
        sink = LendingSink(0, 1 << 20)
        await auth_free.fetch(server.url("f"), 0, 1 << 20, len(DATA), sink)
        assert sink.data == DATA[: 1 << 20]
        assert server.connections == 2


async def test_a_stale_pooled_connection_not_yet_seen_closed_is_replaced(
    bridge: AioBridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that closes the connection as the request arrives: the pooled one fails before a
    reply, and the transfer goes on over a fresh one without an error."""
    with origin() as server:
        transport = HttpTransport(bridge)
        await transport.fetch(server.url("f"), 0, 10, len(DATA), LendingSink(0, 10))
        server.latency = 0.3  # hold the next request while its connection is shut down under it
        async with trio.open_nursery() as nursery:
            sink = LendingSink(0, 1000)
            nursery.start_soon(transport.fetch, server.url("f"), 0, 1000, len(DATA), sink)
            with trio.fail_after(5):
                while len(server.requests) < 2:  # noqa: ASYNC110 - the origin runs in threads
                    await trio.sleep(0.01)
            server.drop_connections()
            server.latency = 0.0
        assert sink.data == DATA[:1000]
        assert server.connections == 2 and len(server.requests) == 3


async def test_a_cancelled_transfer_closes_its_connection_and_the_next_one_is_whole(bridge: AioBridge) -> None:
    with FaultyOrigin({"f": DATA}, latency=5.0) as server:
        transport = HttpTransport(bridge)
        sink = LendingSink(0, 10)
        with trio.move_on_after(0.2):
            await transport.fetch(server.url("f"), 0, 10, len(DATA), sink)
        assert sink.closed == 1 and sink.filled == 0
        server.latency = 0.0
        sink = LendingSink(0, 10)
        await transport.fetch(server.url("f"), 0, 10, len(DATA), sink)
        assert sink.data == DATA[:10]


async def test_a_redirect_is_followed_by_aiohttp(bridge: AioBridge) -> None:
    with FaultyOrigin({"f": DATA}, redirect={"moved": "f"}) as server:
        sink = LendingSink(100, 5000)
        await HttpTransport(bridge).fetch(server.url("moved"), 100, 5000, len(DATA), sink)
    assert sink.data == DATA[100:5100] and sink.closed == 1
    agents = [request.headers.get("User-Agent", "") for request in server.requests]
    assert agents[0] == "datalakefs" and agents[1:] and all("aiohttp" in agent.lower() for agent in agents[1:])


class Tokens(NoAuth):
    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)

    def headers(self, url: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[0]}"}

    def renew(self) -> bool:
        if len(self.tokens) > 1:
            self.tokens.pop(0)
            return True
        return False


async def test_a_refusal_then_success_renews_once_and_receives_the_body(bridge: AioBridge) -> None:
    with origin(bearer={"new"}) as server:
        transport = HttpTransport(bridge, auth=Tokens("old", "new"))
        sink = LendingSink(0, 1 << 20)
        await transport.fetch(server.url("f"), 0, 1 << 20, len(DATA), sink)
    assert sink.data == DATA[: 1 << 20] and transport.renewals == 1
    assert [r.headers.get("Authorization") for r in server.requests] == ["Bearer old", "Bearer new"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate (and its key, in the same PEM) for 127.0.0.1."""
    work = tmp_path_factory.mktemp("tls")
    pem = work / "server.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(pem), "-out", str(work / "cert.pem")],
        check=True, capture_output=True,
    )
    pem.write_text(pem.read_text() + (work / "cert.pem").read_text())
    return pem


class Trusting(NoAuth):
    """Trusts ``certificate`` (as the CA policy's context would trust the storage's CA)."""

    def __init__(self, certificate: Path) -> None:
        self.context = ssl.create_default_context(cafile=str(certificate))

    def ssl_context(self, url: str) -> ssl.SSLContext | None:
        return self.context


async def test_tls_bodies_are_decrypted_into_the_lent_memory_over_kept_alive_connections(
    bridge: AioBridge, certificate: Path
) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(certificate))
    with origin(tls=server_context) as server:
        assert server.url("f").startswith("https://")
        transport = HttpTransport(bridge, auth=Trusting(certificate))
        for start, length in [(0, len(DATA)), (77, 1 << 20), (len(DATA) - 3, 3)]:
            sink = LendingSink(start, length)
            await transport.fetch(server.url("f"), start, length, len(DATA), sink)
            assert sink.data == DATA[start : start + length]
            assert sink.copied <= 16 << 10
        assert server.connections == 1
        with pytest.raises(RangeReadError) as caught:  # the default context does not trust it
            await HttpTransport(bridge).fetch(server.url("f"), 0, 10, len(DATA), LendingSink(0, 10))
        assert caught.value.kind is FailureKind.CONNECTION


async def test_the_cache_writer_receives_whole_blocks_without_a_copy(bridge: AioBridge, tmp_path: Path) -> None:
    """The block writer lends its page-aligned block buffer: every byte of a long transfer is received
    into it (none through ``write``), and each block lands with its checksums."""
    block_size = 1 << 20
    key = FileKey.of(DIDInfo(DID("s", "f"), DIDType.FILE, size=len(DATA)))
    landed: list[LandedBlock] = []
    arrived: list[ArrivedBlock] = []
    writes: list[int] = []
    writer = BlockWriter(str(tmp_path), str(tmp_path / "f.data"), key, block_size, 0, 4, landed.append,
                         on_arrival=arrived.append, direct=True)
    plain_write = writer.write

    def counting_write(offset: int, data: bytes | memoryview) -> None:
        writes.append(len(data))
        plain_write(offset, data)

    writer.write = counting_write  # type: ignore[method-assign]
    with origin() as server:
        await HttpTransport(bridge).fetch(server.url("f"), 0, len(DATA), len(DATA), writer)
    assert sum(writes) <= 16 << 10  # the bytes that came with the head
    assert [block.index for block in landed] == [0, 1, 2, 3]
    assert (tmp_path / "f.data").read_bytes() == DATA
    for early in arrived:
        assert early.resident[:] == DATA[early.index * block_size :][: len(early.resident)]
        early.resident.release()


async def test_a_sink_failing_to_lend_fails_its_transfer_only(bridge: AioBridge) -> None:
    class Broken(LendingSink):
        def receive_buffer(self, offset: int) -> memoryview | None:
            if self.filled > 50_000:
                raise RuntimeError("sink bug")
            return super().receive_buffer(offset)

    with origin() as server:
        transport = HttpTransport(bridge)
        broken = Broken(0, 1 << 20)
        with pytest.raises(RuntimeError, match="sink bug"):
            await transport.fetch(server.url("f"), 0, 1 << 20, len(DATA), broken)
        assert broken.closed == 1 and broken.data == DATA[: broken.filled]
        after = LendingSink(0, 1 << 20)
        await transport.fetch(server.url("f"), 0, 1 << 20, len(DATA), after)
        assert after.data == DATA[: 1 << 20]


async def test_a_server_that_never_answers_is_a_timeout_after_the_stall_time(bridge: AioBridge) -> None:
    with FaultyOrigin({"f": DATA}, latency=5.0) as server:
        sink = LendingSink(0, 10)
        with pytest.raises(RangeReadError) as caught:
            await HttpTransport(bridge, stall_timeout=0.3).fetch(server.url("f"), 0, 10, len(DATA), sink)
    assert caught.value.kind is FailureKind.TIMEOUT and "no data" in str(caught.value)
    assert sink.closed == 1 and sink.filled == 0
