"""The demo lake's write authoriser: nginx asks it (``auth_request``) before every WebDAV change.

    dav_auth.py --port P --key ISSUER_KEY --issuer ISS --audience AUD --log LOG

nginx forwards each PUT, DELETE, MKCOL, MOVE and COPY here with ``X-Original-Method``,
``X-Original-URI``, the ``Destination`` of a MOVE/COPY, the ``Authorization`` header and, for a
request that came through the https door, the subject of the client certificate that the door
verified (``X-Client-Verified``; see dav_tls_front.py). Reads never come here: they stay anonymous.

The answer: 204 allowed; 401 no credential at all; 403 a credential that is invalid or does not
allow this change. Allowed are

* a WLCG token of the lake's issuer and audience, valid now, whose scope has ``storage.create:<p>``
  (PUT, MKCOL of a path under ``<p>``) or ``storage.modify:<p>`` (any change under ``<p>``), paths
  relative to the RSE tree (``/SCRATCH/...``), as XrdAccSciTokens reads them on the token origin;
* a client certificate that the https door verified against the demo CA (the user certificate, or
  an RFC 3820 proxy of it).

Each decision is logged with the method, path and reason; never the token.
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from token_kit import InvalidToken, _load_key, verify

LOG = logging.getLogger("dav-auth")
CREATES = {"PUT", "MKCOL"}


def _path(uri: str) -> str:
    path = urllib.parse.unquote(urllib.parse.urlsplit(uri).path)
    return posixpath.normpath("/" + path.lstrip("/"))


def _covers(scope_path: str, path: str) -> bool:
    base = posixpath.normpath("/" + scope_path.lstrip("/"))
    return base == "/" or path == base or path.startswith(base + "/")


def token_allows(scope: str, method: str, paths: list[str]) -> bool:
    """Whether a token with ``scope`` may apply ``method`` to every one of ``paths``."""
    granted = []
    for item in scope.split():
        kind, _, where = item.partition(":")
        if kind == "storage.modify" or (kind == "storage.create" and method in CREATES):
            granted.append(where or "/")
    return all(any(_covers(where, path) for where in granted) for path in paths)


class Authoriser:
    def __init__(self, args: argparse.Namespace) -> None:
        self.public_key = _load_key(args.key).public_key()
        self.issuer = args.issuer
        self.audience = args.audience

    def decide(self, method: str, paths: list[str], authorization: str, verified: str) -> tuple[int, str]:
        if authorization.lower().startswith("bearer "):
            try:
                claims = verify(authorization[7:].strip(), self.public_key, self.issuer, self.audience, time.time())
            except InvalidToken as exc:
                return 403, f"token refused: {exc}"
            if not token_allows(str(claims.get("scope", "")), method, paths):
                return 403, f"token scope {claims.get('scope')!r} does not allow {method}"
            return 204, f"token of {claims.get('sub')!r}"
        if verified:
            return 204, f"certificate {verified}"
        return 401, "no credential"


def handler(authoriser: Authoriser) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
            method = self.headers.get("X-Original-Method", "")
            paths = [_path(self.headers.get("X-Original-URI", "/"))]
            destination = self.headers.get("Destination", "")
            if destination:
                paths.append(_path(destination))
            status, reason = authoriser.decide(
                method, paths, self.headers.get("Authorization", ""), self.headers.get("X-Client-Verified", "")
            )
            LOG.info("%s %s %s: %s", status, method, " -> ".join(paths), reason)
            self.send_response(status)
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="datalakefs demo lake"')
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser()
    for option in ("--key", "--issuer", "--audience", "--log"):
        parser.add_argument(option, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(filename=args.log, level=logging.INFO, format="%(asctime)s %(message)s")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(Authoriser(args)))
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
