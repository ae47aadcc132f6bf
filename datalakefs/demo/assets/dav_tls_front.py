"""The https door of the demo lake's WebDAV server: TLS that accepts RFC 3820 proxies, then nginx.

    dav_tls_front.py --port P --backend SOCKET --cert CERT --key KEY --ca CA_PEM --log LOG

nginx cannot verify proxy certificates (OpenSSL needs X509_V_FLAG_ALLOW_PROXY_CERTS, for which
nginx has no directive), so this front terminates TLS itself: it asks for a client certificate,
verifies it against the demo CA with proxies allowed (a certificate of another CA fails the
handshake; none at all is fine), and hands the connection to nginx's internal port (its unix
socket, which only the lake's owner can reach) with every request head rewritten:
``X-Client-Verified`` carries the verified subject, and any such header the client sent is dropped.
The connection stays open for further requests, as a production storage's does: the front reads
each request's head and copies exactly its body (``Content-Length`` or chunked), so every request
that reaches nginx through here was seen by the front. nginx trusts ``X-Client-Verified`` only on
that socket.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys

LOG = logging.getLogger("dav-tls-front")
MAX_HEAD = 64 << 10
DROPPED = (b"x-client-verified:",)
COPY = 1 << 20


def _subject(peer: dict | None) -> str:
    if not peer:
        return ""
    parts = [f"{key}={value}" for rdn in peer.get("subject", ()) for key, value in rdn]
    return "/" + "/".join(parts)


def rewrite(head: bytes, subject: str) -> bytes:
    """``head`` (request line and headers, without the blank line) with our header."""
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(DROPPED)]
    if subject:
        lines.append(b"X-Client-Verified: " + subject.encode("utf-8", "replace"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        _end_writing(writer)


def _end_writing(writer: asyncio.StreamWriter) -> None:
    """Half-close ``writer`` (the other direction may still carry an answer), or close it."""
    if writer.can_write_eof():
        try:
            writer.write_eof()
            return
        except (OSError, RuntimeError):
            pass
    writer.close()


def framing(head: bytes) -> int | None:
    """The length of the body that follows request ``head``; None for a chunked one."""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"transfer-encoding" and value != b"identity":
            return None
        if name == b"content-length":
            length = int(value)
    return length


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    while size > 0:
        data = await reader.read(min(COPY, size))
        if not data:
            raise asyncio.IncompleteReadError(b"", size)
        size -= len(data)
        writer.write(data)
        await writer.drain()


async def _copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        line = await reader.readuntil(b"\r\n")
        writer.write(line)
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                writer.write(trailer)
            writer.write(trailer)
            return
        await _copy(reader, writer, size + 2)


async def _requests(reader: asyncio.StreamReader, back_writer: asyncio.StreamWriter, subject: str) -> None:
    """Each request of the client's connection, in turn: its head rewritten, its body copied exactly."""
    try:
        while head := await _next_head(reader):
            back_writer.write(rewrite(head[:-4], subject))
            length = framing(head)
            if length is None:
                await _copy_chunked(reader, back_writer)
            else:
                await _copy(reader, back_writer, length)
            await back_writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError, OSError):
        pass  # a broken or malformed request ends the connection
    finally:
        _end_writing(back_writer)


async def _next_head(reader: asyncio.StreamReader) -> bytes:
    """The next request's head, or b"" when the client closed the connection between requests."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return b""


async def handle(backend: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    subject = _subject(writer.get_extra_info("peercert"))
    try:
        back_reader, back_writer = await asyncio.open_unix_connection(backend)
    except OSError as exc:
        LOG.error("nginx unreachable: %s", exc)
        writer.close()
        return
    requests = asyncio.create_task(_requests(reader, back_writer, subject))
    await _pump(back_reader, writer)  # nginx's answers, until it closes (after the client did, or on its own)
    requests.cancel()
    writer.close()
    back_writer.close()


async def serve(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=args.ca)
    context.load_cert_chain(args.cert, args.key)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    server = await asyncio.start_server(
        lambda r, w: handle(args.backend, r, w), "127.0.0.1", args.port, ssl=context, limit=MAX_HEAD
    )
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    for option in ("--backend", "--cert", "--key", "--ca", "--log"):
        parser.add_argument(option, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(filename=args.log, level=logging.INFO, format="%(asctime)s %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
