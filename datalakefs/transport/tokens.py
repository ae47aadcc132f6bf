"""Storage credentials: a WLCG bearer token found the standard way, else an X509 proxy.

**Discovery** (WLCG Bearer Token Discovery, checked in this order on every lookup):

1. ``$BEARER_TOKEN``: the token itself;
2. ``$BEARER_TOKEN_FILE``: a file holding it (when the variable is set, no other place is looked at);
3. ``$XDG_RUNTIME_DIR/bt_u<uid>``;
4. ``/tmp/bt_u<uid>``.

A token file is read again only when it changed, and looked at (one ``stat``: inode, size, mtime in ns)
at most once per :data:`RECHECK_INTERVAL`: a ``stat`` before every GET was a per-file cost of reading
small files. A token that another process rotates (a notebook pod's refresher, ``oidc-token`` in a cron
job) is used from the first request a second later at most, and at once after a 401 or 403 (see
``renew`` below). Surrounding whitespace is stripped; an empty file means no token.

**Safety.** A token file that its group or others may read or write, or that belongs to someone other than
the mounting user or root, is refused (never read): the lookup logs one clear error per file state and
answers "no token", and :meth:`BearerToken.check` raises :class:`ConfigError` with the same text at mount
time. A token is never sent over plain ``http://`` to a host other than ``localhost`` or a loopback
address, judged by the URL alone (a name that resolves to 127.0.0.1 counts as remote):
:meth:`StorageAuth.headers` raises :class:`AccessDeniedError` instead, unless
``allow_token_over_http`` says so. Every token read is registered with
:func:`datalakefs.redaction.register_secret`, so it never shows up in a log line or error text.

**Requests.** :meth:`StorageAuth.headers` gives ``Authorization: Bearer <token>`` for every HTTP data
request (XCache included: it passes the header on to the origin). :meth:`StorageAuth.renew` re-reads the
token unconditionally and says whether it changed: the transport calls it once after a 401 or 403
(XRootD answers an expired token with 403) and repeats the request only then. Without a token, an X509
proxy (``$X509_USER_PROXY``, else ``/tmp/x509up_u<uid>``) is presented as TLS client certificate; its
TLS context is rebuilt when the file changes (one ``stat`` per request), so a renewed proxy is used
without a remount. Every https context trusts what :mod:`datalakefs.transport.tls` says.

All methods are thread-safe and cheap; they run on the transport's asyncio thread.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from datalakefs.errors import AccessDeniedError, ConfigError
from datalakefs.redaction import register_secret
from datalakefs.transport.tls import client_context

log = logging.getLogger(__name__)

#: Seconds a token file's state is trusted before it is looked at again (a forced ``renew`` ignores it).
RECHECK_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class _FileState:
    inode: int
    size: int
    mtime_ns: int
    mode: int
    owner: int

    @classmethod
    def of(cls, st: os.stat_result) -> _FileState:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid)


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


def insecure_reason(path: Path, st: os.stat_result, uid: int) -> str | None:
    """Why a token file must not be used, or None when only its owner can use it and that owner is the
    mounting user ``uid`` or root (a file others can write is refused too: they could slip in a token
    of their own)."""
    if st.st_uid not in (uid, 0):
        return (
            f"bearer token file {path} belongs to uid {st.st_uid}, not to the mounting user (uid {uid}) "
            f"or root; it was not used"
        )
    mode = st.st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"bearer token file {path} is readable or writable by its group or others "
            f"(mode {stat.S_IMODE(mode):04o}); "
            f"it was not used: run `chmod 600 {path}`"
        )
    return None


class BearerToken:
    """The current WLCG bearer token, re-read when its file changes."""

    def __init__(self, environ: Mapping[str, str] | None = None, uid: int | None = None, *,
                 recheck_interval: float = RECHECK_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self._uid = os.getuid() if uid is None else uid
        self._lock = threading.Lock()
        self._recheck_interval = recheck_interval
        self._clock = clock
        self._looked_at: float | None = None  # when the file's state was last taken (clock time)
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
        reason = insecure_reason(found[0], found[1], self._uid)
        if reason is not None:
            raise ConfigError(reason)

    def token(self) -> str | None:
        """The token to send now (no system call within :data:`RECHECK_INTERVAL` of the last look, else
        one ``stat``, and a read if the file changed)."""
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
        now = self._clock()
        with self._lock:
            if not force and self._looked_at is not None and now - self._looked_at < self._recheck_interval:
                return self._token
        found = self._stat_first()
        with self._lock:
            self._looked_at = now
            if found is None:
                self._path, self._state, self._token = None, None, None
                return None
            path, st = found
            state = _FileState.of(st)
            if not force and path == self._path and state == self._state:
                return self._token
            reason = insecure_reason(path, st, self._uid)
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


class X509Proxy:
    """The X509 proxy file as a TLS client context, rebuilt when the file changes (a renewed proxy)."""

    def __init__(self, path: Path, environ: Mapping[str, str], ca_bundle: str | None) -> None:
        self.path = path
        self._environ = environ
        self._ca_bundle = ca_bundle
        self._lock = threading.Lock()
        self._state: _FileState | None = None
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext | None:
        """The context presenting the proxy as it is now; None while the file is missing or unusable
        (warned once per file state)."""
        try:
            state = _FileState.of(self.path.stat())
        except OSError:
            return None
        with self._lock:
            if state != self._state:
                self._state = state
                try:
                    self._context = client_context(self._environ, self._ca_bundle, self.path)
                except ConfigError as exc:  # the proxy may be meant for something else: reads still work
                    log.warning("%s; HTTPS requests go without a client certificate", exc)
                    self._context = None
            return self._context


def token_allowed(url: str) -> bool:
    """Whether a bearer token may travel to ``url``: https, or plain http to localhost or a loopback
    address written as such in the URL."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StorageAuth:
    """What every storage request presents: bearer token, else X509 proxy, and whom https trusts."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        uid: int | None = None,
        *,
        ca_bundle: str | None = None,
        allow_token_over_http: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        env = dict(os.environ if environ is None else environ)
        user = os.getuid() if uid is None else uid
        self.bearer = BearerToken(env, user, clock=clock)
        self._trust = client_context(env, ca_bundle)
        proxy = x509_proxy_path(env, user)
        self._proxy = None if proxy is None else X509Proxy(proxy, env, ca_bundle)
        self._allow_http = allow_token_over_http

    def check(self) -> None:
        """Refuse an insecure token file before the mount starts (see :meth:`BearerToken.check`)."""
        self.bearer.check()

    def headers(self, url: str) -> Mapping[str, str]:
        token = self.bearer.token()
        if not token:
            return {}
        if not self._allow_http and not token_allowed(url):
            host = urlsplit(url).hostname
            raise AccessDeniedError(
                f"the bearer token was not sent to {host}: plain http:// to a host other than localhost "
                "would expose it on the network; use https, or set allow_token_over_http = true"
            )
        return {"Authorization": f"Bearer {token}"}

    def ssl_context(self, url: str) -> ssl.SSLContext | None:
        """The TLS context for ``url`` (None for plain http): the X509 proxy as client certificate when
        no token is sent, trusting the CA policy's CAs either way."""
        if not url.startswith("https:"):
            return None
        if self._proxy is not None and not self.bearer.token():
            context = self._proxy.context()
            if context is not None:
                return context
        return self._trust

    def renew(self) -> bool:
        return self.bearer.renew()

    @property
    def proxy(self) -> Path | None:
        """The X509 proxy file when it is usable now."""
        return None if self._proxy is None or self._proxy.context() is None else self._proxy.path

    def describe(self) -> dict[str, str | int | None]:
        """For the status file: where credentials come from (paths only) and how often the token file
        was read."""
        proxy = self.proxy
        return {
            "bearer_token": self.bearer.describe(),
            "token_reads": self.bearer.reads,
            "x509_proxy": None if proxy is None else str(proxy),
        }
