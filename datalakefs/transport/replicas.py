"""Which URLs a file is read from, best first: the XCache, then the replicas themselves.

Rules (:func:`candidates`):

* Only HTTP(S) URLs are streamable. ``dav``/``davs`` PFNs are the same protocol and are read as
  ``http``/``https``. A ``root://`` PFN becomes streamable only through an XCache's HTTP endpoint.
* Replicas are ordered by ``Config.rse_preference`` (listed RSEs first, in that order), then in the
  catalogue's order (its sort). The catalogue may already have applied the preference; doing it again is
  harmless because the sort is stable.
* With ``Config.xcache`` set, every replica the XCache can serve (of the RSEs in ``Config.xcache_rses``,
  when it names some) yields an XCache URL, and all XCache URLs come before all direct URLs:

  - ``swap`` (an XCache with a fixed origin): the PFN with scheme, host and port replaced by the XCache's
    HTTP endpoint; path and query are kept (a ``root://`` path's leading ``//`` becomes ``/``).
  - ``rucio`` (a forwarding XCache, as Rucio's ``root-proxy-internal`` expects): a PFN
    ``root://<proxy>//<inner>`` whose inner URL is ``root://`` is read as ``<xcache>//<inner>``, and so
    is a plain ``root://`` PFN. An inner ``http(s)://`` URL cannot be forwarded (XCache without the
    XrdClHttp plugin answers 405), so such replicas are only read directly.

* A Rucio proxy PFN whose inner URL is HTTP(S) is read directly from that inner URL.
* Duplicate URLs are dropped, keeping the first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from datalakefs.config import Config
from datalakefs.errors import ConfigError
from datalakefs.model import FileReplicas
from datalakefs.transport.http import redact_url

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HTTP_SCHEMES = {"http": "http", "https": "https", "dav": "http", "davs": "https"}
_ROOT_SCHEMES = frozenset({"root", "xroot"})


@dataclass(frozen=True, slots=True)
class Candidate:
    """One URL to try, and where it leads."""

    url: str
    rse: str
    via_xcache: bool

    def __str__(self) -> str:
        return f"{self.rse}{' via XCache' if self.via_xcache else ''} ({redact_url(self.url)})"


def _scheme(url: str) -> str | None:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def _proxied_inner(pfn: str) -> str | None:
    """The inner URL of a Rucio proxy PFN ``root://proxy//<scheme>://...``, else None."""
    match = _SCHEME.match(pfn)
    if match is None or match.group(1).lower() not in _ROOT_SCHEMES:
        return None
    inner = pfn[match.end() :].partition("/")[2].lstrip("/")
    return inner if _scheme(inner) is not None else None


def _xcache_endpoint(config: Config) -> tuple[str, str]:
    text = (config.xcache or "").strip()
    parts = urlsplit(text if "://" in text else "http://" + text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
        raise ConfigError(f"option xcache: {config.xcache!r} is not host:port or http(s)://host:port")
    return parts.scheme, parts.netloc


def _direct_url(pfn: str) -> str | None:
    url = _proxied_inner(pfn) or pfn
    scheme = _scheme(url)
    if scheme not in _HTTP_SCHEMES:
        return None
    return _HTTP_SCHEMES[scheme] + url[len(scheme) :]


def _swap_url(pfn: str, endpoint: tuple[str, str]) -> str | None:
    url = _proxied_inner(pfn) or pfn
    scheme = _scheme(url)
    if scheme not in _HTTP_SCHEMES and scheme not in _ROOT_SCHEMES:
        return None
    parts = urlsplit(url)
    path = "/" + parts.path.lstrip("/")
    return urlunsplit((endpoint[0], endpoint[1], path, parts.query, ""))


def _forward_url(pfn: str, endpoint: tuple[str, str]) -> str | None:
    inner = _proxied_inner(pfn) or pfn
    if _scheme(inner) not in _ROOT_SCHEMES:
        return None
    return f"{endpoint[0]}://{endpoint[1]}//{inner}"


def candidates(file: FileReplicas, config: Config) -> tuple[Candidate, ...]:
    """The URLs to read ``file`` from, in the order to try them (see the module docstring)."""
    replicas = file.by_preference(config.rse_preference)
    found: list[Candidate] = []
    if config.xcache:
        endpoint = _xcache_endpoint(config)
        rewrite = _swap_url if config.xcache_mode == "swap" else _forward_url
        # a fixed-origin XCache fronts some RSEs only: the others' files are not behind it
        fronted = [r for r in replicas if not config.xcache_rses or r.rse in config.xcache_rses]
        for replica in fronted:
            url = rewrite(replica.pfn, endpoint)
            if url is not None:
                found.append(Candidate(url, replica.rse, via_xcache=True))
    for replica in replicas:
        url = _direct_url(replica.pfn)
        if url is not None:
            found.append(Candidate(url, replica.rse, via_xcache=False))
    seen: set[str] = set()
    unique = []
    for candidate in found:
        if candidate.url not in seen:
            seen.add(candidate.url)
            unique.append(candidate)
    return tuple(unique)
