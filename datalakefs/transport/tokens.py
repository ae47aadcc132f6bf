"""Storage credentials: a WLCG bearer token found the standard way, else an X509 proxy.

**Discovery** (WLCG Bearer Token Discovery, checked in this order on every lookup):

1. ``$BEARER_TOKEN``: the token itself;
2. ``$BEARER_TOKEN_FILE``: a file holding it (when the variable is set, no other place is looked at);
3. ``$XDG_RUNTIME_DIR/bt_u<uid>``;
4. ``/tmp/bt_u<uid>``.

A token file is read again only when it changed: each lookup costs one ``stat`` (inode, size, mtime in
ns), so a token that another process rotates (a notebook pod's refresher, ``oidc-token`` in a cron job)
is used from the next request on. Surrounding whitespace is stripped; an empty file means no token.

**Safety.** A token file that its group or others may read or write is refused (never read): the lookup logs
one clear error per file state and answers "no token", and :meth:`BearerToken.check` raises
:class:`ConfigError` with the same text at mount time. Every token read is registered with
:func:`datalakefs.redaction.register_secret`, so it never shows up in a log line or error text.

**Requests.** :meth:`StorageAuth.headers` gives ``Authorization: Bearer <token>`` for every HTTP data
request (XCache included: it passes the header on to the origin). :meth:`StorageAuth.renew` re-reads the
token unconditionally and says whether it changed: the transport calls it once after a 401 or 403
(XRootD answers an expired token with 403) and repeats the request only then. Without a token, an X509
proxy (``$X509_USER_PROXY``, else ``/tmp/x509up_u<uid>``) is presented as TLS client certificate.

All methods are thread-safe and cheap; they run on the transport's asyncio thread.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from datalakefs.errors import ConfigError
from datalakefs.redaction import register_secret

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _FileState:
    inode: int
    size: int
    mtime_ns: int
    mode: int


def token_locations(environ: Mapping[str, str], uid: int) -> tuple[str, tuple[Path, ...]]:
    """Where to look: ``("env", ())`` for ``$BEARER_TOKEN``, else ``("file", candidate paths)``."""
    if environ.get("BEARER_TOKEN", "").strip():
        return "env", ()
    explicit = environ.get("BEARER_TOKEN_FILE")
    if explicit:
        return "file", (Path(explicit),)
    found = []
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        found.append(Path(runtime) / f"bt_u{uid}")
    found.append(Path(f"/tmp/bt_u{uid}"))
    return "file", tuple(found)


def insecure_reason(path: Path, mode: int) -> str | None:
    """Why a token file with ``mode`` must not be used, or None when only its owner can use it (a file
    others can write is refused too: they could slip in a token of their own)."""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"bearer token file {path} is readable or writable by its group or others "
            f"(mode {stat.S_IMODE(mode):04o}); "
            f"it was not used: run `chmod 600 {path}`"
        )
    return None


class BearerToken:
    """The current WLCG bearer token, re-read when its file changes."""

    def __init__(self, environ: Mapping[str, str] | None = None, uid: int | None = None) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self._uid = os.getuid() if uid is None else uid
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._state: _FileState | None = None
        self._token: str | None = None
        self._refused: tuple[Path, _FileState] | None = None  # logged once per file state
        self.reads = 0  # how often a file was actually read (tests and status)
        kind, self._paths = token_locations(self._environ, self._uid)
        self._from_env = kind == "env"
        if self._from_env:
            self._token = self._environ["BEARER_TOKEN"].strip()
            register_secret(self._token)

    def describe(self) -> str:
        """Where the token comes from, for status and logs (never the token)."""
        if self._from_env:
            return "$BEARER_TOKEN"
        with self._lock:
            current = self._path
        if current is not None:
            return str(current)
        return "none (looked in " + ", ".join(map(str, self._paths)) + ")"

    def check(self) -> None:
        """Raise :class:`ConfigError` when the token file that would be used is readable by others."""
        found = None if self._from_env else self._stat_first()
        if found is None:
            return
        reason = insecure_reason(found[0], found[1].st_mode)
        if reason is not None:
            raise ConfigError(reason)

    def token(self) -> str | None:
        """The token to send now (one ``stat`` unless the file changed)."""
        return self._lookup(force=False)

    def renew(self) -> bool:
        """Re-read the token whatever the file's state; True when it differs from the one used before."""
        with self._lock:
            before = self._token
        return self._lookup(force=True) != before

    # -- internals ---------------------------------------------------------------------------------

    def _stat_first(self) -> tuple[Path, os.stat_result] | None:
        """The first token file that exists and its stat (one ``stat`` per candidate looked at)."""
        for path in self._paths:
            try:
                return path, path.stat()
            except OSError:
                continue
        return None

    def _lookup(self, *, force: bool) -> str | None:
        if self._from_env:
            return self._token
        found = self._stat_first()
        with self._lock:
            if found is None:
                self._path, self._state, self._token = None, None, None
                return None
            path, st = found
            state = _FileState(st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
            if not force and path == self._path and state == self._state:
                return self._token
            reason = insecure_reason(path, st.st_mode)
            if reason is not None:
                if self._refused != (path, state):
                    self._refused = (path, state)
                    log.error("%s", reason)
                self._path, self._state, self._token = path, state, None
                return None
            try:
                text = path.read_text(encoding="utf-8", errors="replace").strip()
            except OSError as exc:
                log.warning("bearer token file %s cannot be read: %s", path, exc.strerror or exc)
                return self._token
            self.reads += 1
            token = text or None
            if token is not None:
                register_secret(token)
            if token != self._token:
                log.debug("bearer token from %s (re)loaded", path)
            self._path, self._state, self._token = path, state, token
            return token


def x509_proxy_path(environ: Mapping[str, str], uid: int) -> Path | None:
    """``$X509_USER_PROXY``, else ``/tmp/x509up_u<uid>``, if that file exists."""
    candidate = Path(environ.get("X509_USER_PROXY") or f"/tmp/x509up_u{uid}")
    return candidate if candidate.is_file() else None


def x509_context(proxy: Path, environ: Mapping[str, str]) -> ssl.SSLContext:
    """A TLS client context presenting ``proxy`` (certificate chain and key in one PEM file), trusting the
    system CAs plus ``$X509_CERT_DIR`` (the grid CA directory) when set."""
    context = ssl.create_default_context()
    cert_dir = environ.get("X509_CERT_DIR")
    if cert_dir and os.path.isdir(cert_dir):
        context.load_verify_locations(capath=cert_dir)
    try:
        context.load_cert_chain(str(proxy))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"X509 proxy {proxy} cannot be used as client certificate: {exc}") from None
    return context


class StorageAuth:
    """What the HTTP transport sends with each data request: bearer token, else X509 proxy."""

    def __init__(self, environ: Mapping[str, str] | None = None, uid: int | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        user = os.getuid() if uid is None else uid
        self.bearer = BearerToken(env, user)
        proxy = x509_proxy_path(env, user)
        self._proxy_context: ssl.SSLContext | None = None
        if proxy is not None:
            try:
                self._proxy_context = x509_context(proxy, env)
            except ConfigError as exc:  # the proxy may be meant for something else: reads still work
                log.warning("%s; HTTPS reads go without a client certificate", exc)
                proxy = None
        self.proxy = proxy

    def check(self) -> None:
        """Refuse an insecure token file before the mount starts (see :meth:`BearerToken.check`)."""
        self.bearer.check()

    def headers(self, _url: str) -> Mapping[str, str]:
        token = self.bearer.token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def ssl_context(self, url: str) -> ssl.SSLContext | None:
        """The client-certificate context for ``url`` when no token is sent, else None (defaults)."""
        if self._proxy_context is None or not url.startswith("https:") or self.bearer.token():
            return None
        return self._proxy_context

    def renew(self) -> bool:
        return self.bearer.renew()

    def describe(self) -> dict[str, str | int | None]:
        """For the status file: where credentials come from (paths only) and how often the token file
        was read."""
        return {
            "bearer_token": self.bearer.describe(),
            "token_reads": self.bearer.reads,
            "x509_proxy": None if self.proxy is None else str(self.proxy),
        }
