"""Credentials never leave the process as text: every log line and error message is scrubbed here.

What counts as a credential:

* the user info of a URL (``https://user:password@host``) and its query string and fragment, which
  storage systems use for tokens (``?authz=...``, pre-signed URLs): :func:`redact_url` drops them;
* in free text: ``authz=<value>`` (also URL-encoded), ``Authorization: Bearer <value>``, anything that
  looks like a JWT (``eyJ...``), rucio's credential headers (``X-Rucio-Password: ...``, which rucio's
  client logs at DEBUG) and any ``password=``/``password:`` value, and every secret handed to
  :func:`register_secret` (the bearer tokens the transport reads, rucio's auth tokens), whatever their
  shape: :func:`redact_text` replaces them with ``[hidden]``.

:class:`DatalakeError` messages, the log formatter of the command line and the status file go through
:func:`redact_text`, so a token that slipped into an exception text from a library is still hidden.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "[hidden]"
_MIN_SECRET = 8  # shorter strings would blank out ordinary words
_MAX_SECRETS = 64  # tokens rotate: remember the recent ones, not all of them forever

_PATTERNS = (
    # authz=..., authz%3D..., in URLs and in text
    (re.compile(r"(?i)(authz(?:=|%3D))[^&\s#'\",;]+"), r"\g<1>" + HIDDEN),
    # Authorization: Bearer ..., Bearer%20..., "Bearer ..."
    # (a credential is at least 8 characters: "bearer token file ..." is prose, not a token)
    (re.compile(r"(?i)(bearer(?:\s+|%20|\+))[A-Za-z0-9\-._~+/=%]{8,}"), r"\g<1>" + HIDDEN),
    # a JWT anywhere (header.payload.signature, base64url)
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), HIDDEN),
    # user info in any URL
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@"), r"\g<1>" + HIDDEN + "@"),
    # rucio's credential headers and any password assignment (rucio logs request headers at DEBUG)
    (
        re.compile(r"(?i)((?:x-rucio-[a-z-]*(?:password|token|secret)|passw(?:or)?d)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+"),
        r"\g<1>" + HIDDEN,
    ),
    # rucio's "Saving token <token> and expiration ..." (OIDC refresh, DEBUG)
    (re.compile(r"(?i)(saving token\s+)\S+"), r"\g<1>" + HIDDEN),
)

_lock = threading.Lock()
_secrets: OrderedDict[str, None] = OrderedDict()


def register_secret(secret: str) -> None:
    """Hide ``secret`` wherever :func:`redact_text` sees it from now on (recent secrets are kept)."""
    secret = secret.strip()
    if len(secret) < _MIN_SECRET:
        return
    with _lock:
        _secrets[secret] = None
        _secrets.move_to_end(secret)
        while len(_secrets) > _MAX_SECRETS:
            _secrets.popitem(last=False)


def redact_text(text: str) -> str:
    """``text`` with every credential it contains replaced by ``[hidden]``."""
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)  # a secret inside a longer one: the longer first
    for secret in known:
        if secret in text:
            text = text.replace(secret, HIDDEN)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_url(url: str) -> str:
    """``url`` without user info, query string or fragment (they may carry credentials)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
