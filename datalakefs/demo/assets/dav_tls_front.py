"""The https door of the demo lake's WebDAV server: TLS that accepts RFC 3820 proxies, then nginx.

    dav_tls_front.py --port P --backend SOCKET --cert CERT --key KEY --ca CA_PEM --log LOG

nginx cannot verify proxy certificates (OpenSSL needs X509_V_FLAG_ALLOW_PROXY_CERTS, for which
nginx has no directive), so this front terminates TLS itself: it asks for a client certificate,
verifies it against the demo CA with proxies allowed (a certificate of another CA fails the
handshake; none at all is fine), and hands the connection to nginx's internal port with one request
head rewritten (to nginx's unix socket, which only the lake's owner can reach): ``X-Client-Verified`` carries the verified subject (any such header the client sent
is dropped) and ``Connection: close`` makes each connection carry one request, so every request
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
DROPPED = (b"x-client-verified:", b"connection:", b"keep-alive:")


def _subject(peer: dict | None) -> str:
    if not peer:
        return ""
    parts = [f"{key}={value}" for rdn in peer.get("subject", ()) for key, value in rdn]
    return "/" + "/".join(parts)


def rewrite(head: bytes, subject: str) -> bytes:
    """``head`` (request line and headers, without the blank line) with our two headers."""
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(DROPPED)]
    lines.append(b"Connection: close")
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
        if writer.can_write_eof():
            try:
                writer.write_eof()
            except (OSError, RuntimeError):
                writer.close()
        else:
            writer.close()


async def handle(backend: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
        writer.close()
        return
    subject = _subject(writer.get_extra_info("peercert"))
    try:
        back_reader, back_writer = await asyncio.open_unix_connection(backend)
    except OSError as exc:
        LOG.error("nginx unreachable: %s", exc)
        writer.close()
        return
    back_writer.write(rewrite(head[:-4], subject))
    await asyncio.gather(_pump(reader, back_writer), _pump(back_reader, writer))
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
