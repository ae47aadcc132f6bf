"""The Rucio catalogue: the one module that imports rucio-clients.

It implements :class:`~datalakefs.catalogue.base.Catalogue` on top of rucio's ``Client``, turns
rucio's dicts into our frozen types right here, and translates every failure at this boundary:
unknown DIDs or scopes raise ``NotFoundError``; refused credentials (also a TLS handshake that
fails over a certificate) ``AccessDeniedError``; a server
that cannot be reached, times out or fails ``CatalogueUnavailableError``; a filter or name that the
server's schema refuses ``InvalidNameError``; an unusable rucio configuration ``ConfigError``. Error
texts name the server and the reason, never a token.

Invariants and decisions:

* **Blocking, worker threads only.** Every method does network I/O with ``requests``; the trio
  side calls them through :class:`~datalakefs.catalogue.cached.CachedCatalogue`.
* **A pool of clients, not one shared client and not one per thread.** rucio's ``Client`` keeps one
  ``requests.Session`` and mutates it (and its token) on a 401 retry; neither is documented as
  thread-safe, so a client is used by one thread at a time. Thread-local clients would be rebuilt
  whenever trio's thread cache retires an idle worker (after ~10 s), each time re-reading the token
  file, so instead a call borrows an idle client from a small pool and returns it; the pool grows to
  the number of concurrent callers (bounded by the cached catalogue's ``CapacityLimiter``).
* **The rucio configuration is process-wide.** rucio reads ``$RUCIO_CONFIG`` into one cached
  ``ConfigParser`` per process (``rucio.common.config.get_config``), also after the client was built
  (token paths, retries), so there is no per-thread or per-client way to point it at a file. A
  ``rucio_config`` option therefore sets ``RUCIO_CONFIG`` in this process's environment, once, before
  the first client is built. Two open catalogues with different ``rucio_config`` paths in one process
  are refused with ``ConfigError``; :meth:`RucioCatalogue.close` releases the claim.
* **Outages are seen in seconds.** The client's timeout is ``catalogue_timeout`` (rucio's default is
  600 s) and ``request_retries`` is 0, also while the constructor authenticates and whatever
  ``rucio.cfg`` says: rucio then retries a refused connection once, immediately, does not retry a
  read timeout, and backs off 0.25 + 0.5 + 1 s on 502/503/504 before giving up. Measured on
  loopback: refused in ~0.01 s, silent server after the timeout, 503 after ~1.8 s.
* rucio's client logs to ``datalakefs.catalogue.rucio.client`` (our logging tree), not to the stderr
  handler of its own logger.
* Replicas are read with ``read_schemes``, with ``client_location={"site": client_site}`` when set
  (so the server can apply its ``root-proxy-internal`` rewrite), only from RSEs available for reading,
  and ordered by ``rse_preference`` first, then the server's own order.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from typing import Any, Final, NoReturn
from urllib.parse import quote_plus

import requests
from requests.status_codes import codes
from rucio.client import Client
from rucio.client.baseclient import choice
from rucio.common import exception as rucio_exc
from rucio.common.config import clean_cached_config, config_get
from rucio.common.constants import HTTPMethod
from rucio.common.utils import build_url, parse_did_filter_from_string_fe
from rucio.rse import rsemanager

from datalakefs.catalogue import ndjson
from datalakefs.catalogue.base import Batches
from datalakefs.config import Config
from datalakefs.errors import (
    AccessDeniedError,
    CatalogueUnavailableError,
    ConfigError,
    DatalakeError,
    InvalidNameError,
    NotFoundError,
)
from datalakefs.gcpause import gc_paused
from datalakefs.model import (
    DID,
    DIDInfo,
    DIDType,
    FileReplicas,
    Lock,
    LockState,
    Replica,
    RSEReplica,
    Rule,
    RuleState,
)
from datalakefs.redaction import redact_text, register_secret

#: DIDs per bulk request (``get_metadata_bulk``, ``list_replicas``): the server's schema refuses more
#: (``maxItems`` of ``DIDS``/``R_DIDS``; 2000 gave ``InvalidObject``). Measured on the local lake:
#: metadata of 10,000 DIDs in 2.3-3.0 s in chunks of 1000, 2.7-3.2 s in chunks of 500, 3.0-3.3 s in
#: chunks of 250; chunks on 2-4 clients in parallel gained nothing reliable on 2 cores (1.4-3.1 s).
DIDS_PER_REQUEST: Final = 1000

#: Bytes of a streamed listing parsed and handed on at once (about 1,100 rows of ``list_files``: just
#: more than ``listing_times_limit``, so that the first batch lets a large directory be served).
LISTING_CHUNK: Final = 128 * 1024

_NOT_FOUND = (
    rucio_exc.DataIdentifierNotFound,
    rucio_exc.ScopeNotFound,
    rucio_exc.AccountNotFound,
    rucio_exc.RuleNotFound,
    rucio_exc.RSENotFound,
)
_DENIED = (
    rucio_exc.CannotAuthenticate,
    rucio_exc.AccessDenied,
    rucio_exc.CannotAuthorize,
    rucio_exc.NoAuthInformation,
    rucio_exc.IdentityError,
    rucio_exc.ScopeAccessDenied,
)
_INVALID = (
    rucio_exc.InvalidObject,
    rucio_exc.InputValidationError,
    rucio_exc.DIDFilterSyntaxError,
    rucio_exc.DuplicateCriteriaInDIDFilter,
    rucio_exc.InvalidType,
    rucio_exc.InvalidValueForKey,
    rucio_exc.KeyNotFound,
    rucio_exc.UnsupportedOperation,
    rucio_exc.UnsupportedKeyType,
    rucio_exc.FilterEngineGenericError,
    rucio_exc.NameTypeError,
)
_CONFIG = (
    rucio_exc.ConfigNotFound,
    rucio_exc.ConfigLoadingError,
    rucio_exc.MissingClientParameter,
    rucio_exc.ClientProtocolNotFound,
    rucio_exc.ClientProtocolNotSupported,
)
_FILTER_OPERATORS = ("=", "<", ">", "!")
_CLIENT_LOG: Final = logging.getLogger("datalakefs.catalogue.rucio.client")
log = logging.getLogger(__name__)
_DID_TYPES: Final[Mapping[str, DIDType]] = {
    "FILE": DIDType.FILE,
    "F": DIDType.FILE,
    "ARCHIVE": DIDType.FILE,
    "A": DIDType.FILE,
    "DATASET": DIDType.DATASET,
    "D": DIDType.DATASET,
    "CONTAINER": DIDType.CONTAINER,
    "C": DIDType.CONTAINER,
}

_config_lock = threading.Lock()
_config_claims: dict[str, int] = {}
_UNSET: Final = "\0unset"
_env_before = _UNSET


def _claim_rucio_config(path: str) -> str:
    """Point this process's rucio at ``path``; refuse a second, different file (see module doc)."""
    global _env_before
    resolved = os.path.abspath(os.path.expanduser(path))
    with _config_lock:
        others = [p for p, n in _config_claims.items() if n and p != resolved]
        if others:
            raise ConfigError(
                f"option rucio_config: {resolved} cannot be used while {others[0]} is in use in this "
                "process (rucio reads one configuration per process)"
            )
        if not any(_config_claims.values()):
            _env_before = os.environ.get("RUCIO_CONFIG", _UNSET)
        _set_rucio_config_env(resolved)
        _config_claims[resolved] = _config_claims.get(resolved, 0) + 1
    return resolved


def _release_rucio_config(resolved: str) -> None:
    """Undo a claim; the last one restores ``RUCIO_CONFIG`` as it was before the first."""
    with _config_lock:
        _config_claims[resolved] -= 1
        if not any(_config_claims.values()):
            _set_rucio_config_env(_env_before)


def _set_rucio_config_env(value: str) -> None:
    if os.environ.get("RUCIO_CONFIG", _UNSET) == value:
        return
    if value == _UNSET:
        del os.environ["RUCIO_CONFIG"]
    else:
        os.environ["RUCIO_CONFIG"] = value
    clean_cached_config()


class _QuickClient(Client):  # type: ignore[misc]  # rucio ships no type information
    """rucio's client, retrying a refused connection once, already while authenticating in
    ``__init__`` (``REQUEST_RETRIES`` is read before the config file's ``request_retries``).

    Authentication is rucio's own, from ``rucio.cfg`` (``auth_type`` userpass, x509, x509_proxy, oidc,
    ssh, gss, with their credentials). Only where rucio caches its auth token changes: with
    ``token_dir`` and no ``auth_token_file_path`` in ``rucio.cfg``, the token lives in ``token_dir``
    (one per mount) instead of rucio's shared ``/tmp/<user>/.rucio_<account>/``. A configured
    ``auth_token_file_path`` (an OIDC token file another tool refreshes) is used as it is.
    """

    REQUEST_RETRIES = 0

    def __init__(self, *args: Any, token_dir: str | None = None, **kwargs: Any) -> None:
        self._datalakefs_token_dir = token_dir
        super().__init__(*args, **kwargs)

    def _get_auth_tokens(self) -> tuple[str | None, str, str, str]:
        configured, epoch_file, token_file, token_path = super()._get_auth_tokens()
        if configured or self._datalakefs_token_dir is None:
            return configured, epoch_file, token_file, token_path
        directory = self._datalakefs_token_dir
        return (
            None,
            os.path.join(directory, os.path.basename(epoch_file)),
            os.path.join(directory, os.path.basename(token_file)),
            directory,
        )

    def listing_body(self, did: DID, what: str) -> Iterator[bytes]:
        """The body of ``GET /dids/<scope>/<name>/<what>`` as it arrives (``dids``: the content, as
        rucio's ``list_content``; ``files``: the files, as ``list_files``), for :func:`ndjson.batches`
        instead of rucio's per-row parsing (see there), in pieces of at least :data:`LISTING_CHUNK`
        bytes (but the last): the server sends its answer chunked, a row or a few per HTTP chunk, and
        ``iter_content`` hands out each HTTP chunk as it is, so a 100k listing came as tens of thousands
        of pieces, each parsed and handed on by itself (over a thousand READDIRPLUS replies of a few
        dozen entries each for one ``ls``). Errors are rucio's, as its methods raise them."""
        path = "/".join([self.DIDS_BASEURL, quote_plus(did.scope), quote_plus(did.name), what])
        response = self._send_request(build_url(choice(self.list_hosts), path=path), method=HTTPMethod.GET)
        with response:
            if response.status_code != codes.ok:
                exc_cls, exc_msg = self._get_exception(
                    headers=response.headers, status_code=response.status_code, data=response.content
                )
                raise exc_cls(exc_msg)
            pieces: list[bytes] = []
            held = 0
            for piece in response.iter_content(chunk_size=LISTING_CHUNK):
                pieces.append(piece)
                held += len(piece)
                if held >= LISTING_CHUNK:
                    yield b"".join(pieces)
                    pieces, held = [], 0
            if pieces:
                yield b"".join(pieces)


class RucioCatalogue:
    """The catalogue of the Rucio server that rucio's client configuration points at.

    Building it does no I/O; the first call authenticates. Blocking: call from worker threads.
    """

    def __init__(
        self, config: Config, client_factory: Callable[[], Any] | None = None, token_dir: str | None = None
    ) -> None:
        """``client_factory`` builds one rucio ``Client``-like object per pooled client; the
        default builds ``rucio.client.Client`` with our timeout and retries (tests inject stubs).
        ``token_dir``: where rucio caches its auth token for this mount (see :class:`_QuickClient`)."""
        self._timeout = config.catalogue_timeout
        self._token_dir = token_dir
        self._factory = client_factory or self._new_client
        self._schemes = list(config.read_schemes) or None
        self._client_location = {"site": config.client_site} if config.client_site else None
        self._preference = {rse: rank for rank, rse in enumerate(config.rse_preference)}
        self._claimed = _claim_rucio_config(config.rucio_config) if config.rucio_config else None
        self._lock = threading.Lock()
        self._idle: list[Client] = []
        # RSE name -> its settings (protocols, determinism), asked once per mount: each listing's
        # derived names are checked against names the server gave before they are used
        self._rse_settings: dict[str, Mapping[str, Any]] = {}
        self._closed = False
        self._host: str | None = None
        self._account: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the idle clients' connections and release the process-wide rucio configuration."""
        with self._lock:
            idle, self._idle = self._idle, []
            closed, self._closed = self._closed, True
        for client in idle:
            client.session.close()
        if self._claimed is not None and not closed:
            _release_rucio_config(self._claimed)

    @property
    def account(self) -> str | None:
        """The account the clients act as (rucio.cfg's, or ``$RUCIO_ACCOUNT``), known once a first
        client exists; no request (the token rucio fetches is for this very account)."""
        return self._account

    # -- the Catalogue protocol ------------------------------------------------------------------

    def list_scopes(self) -> list[str]:
        with self._client() as client:
            return sorted(str(scope) for scope in client.list_scopes())

    def list_collections(self, scope: str) -> list[DIDInfo]:
        with self._client() as client:
            rows = client.list_dids(scope, [{"name": "*"}], did_type="collection", long=True)
            return _listing_of_scope(client, scope, rows)

    def list_content(self, did: DID) -> Batches:
        with self._client() as client, closing(client.listing_body(did, "dids")) as body:
            what = f"{self._server()}: the content of {did}"
            with gc_paused:  # the rows and their infos, made as the stream arrives
                for rows in ndjson.batches(body, what):
                    yield [_info_from_listing(row) for row in rows]

    def list_files(self, did: DID) -> Batches:
        scopes: dict[str, str] = {}  # one string per scope, not one per row
        with self._client() as client, closing(client.listing_body(did, "files")) as body:
            what = f"{self._server()}: the files of {did}"
            with gc_paused:  # the rows and their infos, made as the stream arrives
                for rows in ndjson.batches(body, what):
                    files = [_info_from_file_row(row, scopes, what) for row in rows]
                    yield _with_md5_where_no_adler32(client, files)

    def get_info(self, did: DID) -> DIDInfo:
        with self._client() as client:
            return _info_from_metadata(client.get_metadata(did.scope, did.name))

    def get_metadata(self, did: DID) -> dict[str, str]:
        with self._client() as client:
            meta = client.get_metadata(did.scope, did.name, plugin="ALL")
        return {str(key): _text(value) for key, value in meta.items() if value is not None}

    def get_infos(self, dids: Sequence[DID]) -> list[DIDInfo]:
        wanted = list(dict.fromkeys(dids))
        found: dict[DID, DIDInfo] = {}
        with self._client() as client:
            for chunk in _chunks(wanted):
                for row in client.get_metadata_bulk(chunk):
                    info = _info_from_metadata(row)
                    found[info.did] = info
        return [found[d] for d in wanted if d in found]

    def list_replicas(self, dids: Sequence[DID]) -> list[FileReplicas]:
        answers: list[FileReplicas] = []
        with self._client() as client:
            for chunk in _chunks(list(dict.fromkeys(dids))):
                rows = client.list_replicas(
                    chunk,
                    schemes=self._schemes,
                    ignore_availability=False,
                    client_location=self._client_location,
                    resolve_archives=False,
                )
                answers.extend(self._file_replicas(row) for row in rows)
        return answers

    def derive_pfns(self, rse: str, dids: Sequence[DID]) -> dict[DID, str]:
        settings = self._rse_settings.get(rse)
        if settings is None:
            with self._client() as client:
                settings = client.get_rse(rse)
            with self._lock:
                self._rse_settings[rse] = settings
        scheme = self._read_scheme(settings)
        if not settings.get("deterministic") or scheme is None:
            return {}
        lfns = [{"scope": did.scope, "name": did.name} for did in dids]
        try:  # computed here, as the server would (rucio's own protocol classes): no call per file
            pfns = rsemanager.lfns2pfns(dict(settings), lfns, operation="read", scheme=scheme, domain="wan")
        except Exception as exc:  # an algorithm or protocol this client cannot compute: ask per file
            log.info("event=derive-pfns-unavailable rse=%s reason=%s", rse, exc)
            return {}
        return {did: str(pfns[key]) for did in dids if (key := f"{did.scope}:{did.name}") in pfns}

    def _read_scheme(self, settings: Mapping[str, Any]) -> str | None:
        """The scheme the server's replica lists put first for this RSE: its best WAN read protocol
        among the configured ``read_schemes``."""
        readable = sorted(
            (int(read), str(protocol["scheme"]))
            for protocol in settings.get("protocols") or ()
            if (read := ((protocol.get("domains") or {}).get("wan") or {}).get("read"))
        )
        allowed = [scheme for _, scheme in readable if self._schemes is None or scheme in self._schemes]
        return allowed[0] if allowed else None

    def query(self, scope: str, filters: str) -> list[DIDInfo]:
        text = filters.strip()
        if not text:
            raise InvalidNameError("an empty query matches nothing")
        if any(op in text for op in _FILTER_OPERATORS):
            try:
                parsed, _ = parse_did_filter_from_string_fe(text, name="*")
            except Exception as exc:
                raise InvalidNameError(f"query filter {text!r}: {_reason(exc)}") from exc
        else:
            parsed = [{"name": text}]
        with self._client() as client:
            rows = client.list_dids(scope, parsed, did_type="all", long=True)
            return _listing_of_scope(client, scope, rows)

    # -- replication rules -----------------------------------------------------------------------

    def replica_on(self, did: DID, rse: str) -> RSEReplica | None:
        with self._client() as client:
            rows = list(client.list_replicas(
                [{"scope": did.scope, "name": did.name}],
                schemes=self._schemes,
                all_states=True,
                rse_expression=rse,
                resolve_archives=False,
            ))
        for row in rows:
            states: Mapping[str, str] = row.get("states") or {}
            if rse not in states:
                continue
            pfns = row.get("pfns") or {}
            mine = tuple(str(pfn) for pfn, meta in pfns.items() if meta.get("rse") == rse)
            return RSEReplica(rse, str(states[rse]).upper() in ("AVAILABLE", "A"), mine)
        return None

    def file_rules(self, did: DID) -> list[Rule]:
        with self._client() as client:
            return [_rule(row) for row in client.list_associated_rules_for_file(did.scope, did.name)]

    def did_rules(self, did: DID) -> list[Rule]:
        with self._client() as client:
            return [_rule(row) for row in client.list_did_rules(did.scope, did.name)]

    def add_rule(self, did: DID, rse: str, lifetime: int | None, activity: str | None,
                 account: str | None, asynchronous: bool = False) -> tuple[Rule, bool]:
        with self._client() as client:
            try:
                ids = client.add_replication_rule(
                    [{"scope": did.scope, "name": did.name}], 1, rse,
                    lifetime=lifetime, activity=activity, account=account, asynchronous=asynchronous,
                )
            except rucio_exc.DuplicateRule:
                owner = account or str(client.account)
                for row in client.list_did_rules(did.scope, did.name):
                    rule = _rule(row)
                    if rule.rse_expression == rse and rule.account == owner:
                        return rule, False
                raise
            return _rule(client.get_replication_rule(ids[0])), True

    def get_rule(self, rule_id: str) -> Rule:
        with self._client() as client:
            return _rule(client.get_replication_rule(rule_id))

    def rule_locks(self, rule: Rule) -> list[Lock]:
        with self._client() as client:
            rows = list(client.list_replica_locks(rule.id))
            sizes: dict[DID, int] = {}
            if len(rows) > 1 or (rows and DID(str(rows[0]["scope"]), str(rows[0]["name"])) != rule.did):
                for row in client.list_files(rule.did.scope, rule.did.name):
                    sizes[DID(str(row["scope"]), str(row["name"]))] = int(row.get("bytes") or 0)
            else:
                meta = client.get_metadata(rule.did.scope, rule.did.name)
                sizes[rule.did] = int(meta.get("bytes") or 0)
        locks = []
        for row in rows:
            did = DID(str(row["scope"]), str(row["name"]))
            locks.append(Lock(did, str(row.get("rse") or ""), _lock_state(row.get("state")), sizes.get(did, 0)))
        return locks

    def borrow(self) -> AbstractContextManager[Client]:
        """A pooled client for calls this class does not wrap (the uploader's); failures raised in
        the ``with`` body are translated like those of the catalogue calls."""
        return self._client()

    # -- internals -------------------------------------------------------------------------------

    def _file_replicas(self, row: Mapping[str, Any]) -> FileReplicas:
        info = DIDInfo(
            did=DID(str(row["scope"]), str(row["name"])),
            type=DIDType.FILE,
            size=_int_or_none(row.get("bytes")),
            adler32=row.get("adler32") or None,
            md5=row.get("md5") or None,
        )
        pfns: Mapping[str, Mapping[str, Any]] = row.get("pfns") or {}
        ordered = sorted(
            pfns.items(),
            key=lambda item: (
                self._preference.get(str(item[1].get("rse")), len(self._preference)),
                int(item[1].get("priority") or 0),
            ),
        )
        return FileReplicas(info, tuple(Replica(str(meta.get("rse")), pfn) for pfn, meta in ordered))

    @contextmanager
    def _client(self) -> Iterator[Client]:
        """Borrow a client for one call; every failure inside is translated (see module doc).

        The body must consume rucio's lazy result generators before it leaves, so that errors raised
        while streaming are translated too.
        """
        try:
            client = self._borrow()
        except Exception as exc:
            self._raise_translated(exc)
        try:
            yield client
        except Exception as exc:
            self._raise_translated(exc, client)
        finally:
            self._give_back(client)

    def _borrow(self) -> Client:
        with self._lock:
            if self._closed:
                raise CatalogueUnavailableError("the catalogue is closed")
            if self._idle:
                return self._idle.pop()
        client = self._factory()
        self._host = str(client.host)
        account = getattr(client, "account", None)
        self._account = None if account is None else str(account)
        return client

    def _new_client(self) -> Client:
        client = _QuickClient(timeout=self._timeout, logger=_CLIENT_LOG, token_dir=self._token_dir)
        client.request_retries = 0  # a rucio.cfg ``request_retries`` was applied at the end of __init__
        return client

    def _give_back(self, client: Client) -> None:
        register_secret(str(getattr(client, "auth_token", "") or ""))  # never in a log or error text
        with self._lock:
            if not self._closed:
                self._idle.append(client)
                return
        client.session.close()

    def _raise_translated(self, exc: BaseException, client: Client | None = None) -> NoReturn:
        """Raise what ``exc`` means (:func:`translate_error`). rucio itself only prints "I/O error" when
        it cannot read or write its token file, and then sends requests without a token ("Token must
        be set"): that is reported as what it is, a refusal naming the file (the mount's first call,
        which proves the credentials, then stops the mount with it)."""
        token = str(getattr(client, "auth_token", "") or "")
        error = translate_error(exc, self._server(), secrets=(token,) if token else ())
        if isinstance(error, CatalogueUnavailableError) and "Token must be set" in str(error):
            unusable = _unusable_token_file()
            if unusable is not None:
                error = AccessDeniedError(f"{self._server()}: cannot authenticate: {unusable}")
        raise error from exc

    def _server(self) -> str:
        """Which server failed: the client's, else the configured one (the first client may not exist)."""
        if self._host is None:
            try:
                self._host = str(config_get("client", "rucio_host", raise_exception=False, default=""))
            except Exception:  # an unreadable config: the error being translated says so
                return "the rucio server"
        return f"rucio server {self._host}" if self._host else "the rucio server"


def _unusable_token_file() -> str | None:
    """Why rucio.cfg's ``auth_token_file_path`` cannot serve this user, or None."""
    path = str(config_get("client", "auth_token_file_path", raise_exception=False, default="") or "")
    if not path:
        return None
    directory = os.path.dirname(path) or "."
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        problem = "cannot be read and written"
    elif not os.access(directory, os.W_OK | os.X_OK):
        problem = f"cannot be created (its directory {directory} is not writable)"
    else:
        return None
    return (f"rucio.cfg names auth_token_file_path = {path}, which {problem} by uid {os.getuid()}; remove "
            "that line (datalakefs then keeps the token in its state directory) or name a file of this user")


def translate_error(exc: BaseException, server: str, secrets: Sequence[str] = ()) -> DatalakeError:
    """The datalakefs error for an exception raised by rucio-clients or ``requests``.

    ``server`` names the server in the message; any of ``secrets`` (the client's token) that shows
    up in rucio's text is blanked out. Our own errors pass through unchanged.
    """
    if isinstance(exc, DatalakeError):
        return exc
    reason = _reason(exc)
    for secret in secrets:
        reason = reason.replace(secret, "[hidden]")
    if isinstance(exc, _NOT_FOUND):
        return NotFoundError(f"{server}: {reason}")
    if isinstance(exc, _DENIED):
        return AccessDeniedError(f"{server} refused our credentials: {reason}")
    if isinstance(exc, _INVALID):
        return InvalidNameError(f"{server} refused the request: {reason}")
    if isinstance(exc, _CONFIG):
        return ConfigError(f"rucio client configuration: {reason}")
    if isinstance(exc, requests.exceptions.SSLError):
        # a certificate problem, not an outage: our client certificate or proxy was not accepted by
        # the server (x509 auth), or the server's was not trusted by ``ca_cert``; retrying cannot help
        return AccessDeniedError(f"{server}: TLS handshake failed, a certificate was not accepted: {reason}")
    if isinstance(exc, requests.Timeout):
        return CatalogueUnavailableError(f"{server} did not answer in time: {reason}")
    if isinstance(exc, requests.ConnectionError | rucio_exc.ServerConnectionException):
        return CatalogueUnavailableError(f"{server} cannot be reached: {reason}")
    return CatalogueUnavailableError(f"{server} failed: {reason}")


def _reason(exc: BaseException) -> str:
    """One line saying why, without rucio's boilerplate; rucio never puts a token in these texts."""
    text = " ".join(str(exc).split())
    if isinstance(exc, rucio_exc.RucioException):
        head, sep, details = text.partition(" Details: ")
        text = f"{type(exc).__name__}: {details if sep else head}"
    elif not text:
        text = type(exc).__name__
    text = redact_text(text)
    return text if len(text) <= 400 else text[:397] + "..."


_RULE_STATES: Final[Mapping[str, RuleState]] = {
    **{state.value: state for state in RuleState},
    "O": RuleState.OK,
    "R": RuleState.REPLICATING,
    "S": RuleState.STUCK,
    "U": RuleState.SUSPENDED,
    "W": RuleState.WAITING_APPROVAL,
    "I": RuleState.INJECT,
}
_LOCK_STATES: Final[Mapping[str, LockState]] = {
    **{state.value: state for state in LockState},
    "O": LockState.OK,
    "R": LockState.REPLICATING,
    "S": LockState.STUCK,
}


def _enum_name(value: object) -> str:
    """Rucio sends states as names or one-letter codes, sometimes as ``RuleState.OK``."""
    return str(getattr(value, "name", value) or "").rpartition(".")[2].upper()


def _lock_state(value: object) -> LockState:
    return _LOCK_STATES.get(_enum_name(value), LockState.REPLICATING)


def _rule(row: Mapping[str, Any]) -> Rule:
    state = _RULE_STATES.get(_enum_name(row.get("state")))
    if state is None:
        raise CatalogueUnavailableError(f"rule {row.get('id')} has an unknown state {row.get('state')!r}")
    error = row.get("error")
    return Rule(
        id=str(row["id"]),
        did=DID(str(row["scope"]), str(row["name"])),
        rse_expression=str(row.get("rse_expression") or ""),
        state=state,
        account=str(row.get("account") or ""),
        locks_ok=int(row.get("locks_ok_cnt") or 0),
        locks_replicating=int(row.get("locks_replicating_cnt") or 0),
        locks_stuck=int(row.get("locks_stuck_cnt") or 0),
        error=" ".join(str(error).split()) or None if error else None,
    )


def _chunks(dids: Sequence[DID]) -> Iterator[list[dict[str, str]]]:
    for start in range(0, len(dids), DIDS_PER_REQUEST):
        yield [{"scope": d.scope, "name": d.name} for d in dids[start : start + DIDS_PER_REQUEST]]


def _listing_of_scope(client: Client, scope: str, rows: Iterable[Mapping[str, Any]]) -> list[DIDInfo]:
    """A ``list_dids`` answer; rucio answers an unknown scope with nothing, so an empty answer costs
    one ``list_scopes`` to tell "no such scope" (``NotFoundError``) from "nothing matches"."""
    infos = [_info_from_listing(row) for row in rows]
    if not infos and scope not in client.list_scopes():
        raise NotFoundError(f"no scope {scope!r} in the catalogue")
    return infos


def _with_md5_where_no_adler32(client: Client, files: list[DIDInfo]) -> list[DIDInfo]:
    """``files`` with the md5 of each file that has no adler32: Rucio's ``list_files`` gives no md5, and
    a file's cache key is its md5 when it has no adler32 (``cache/layout.py``), so without it a listed
    file and the same file looked up alone would be cached, and verified, under different keys. One
    bulk metadata call per 1,000 such files; none for a dataset whose files all have an adler32."""
    unverifiable = [index for index, info in enumerate(files) if not info.adler32]
    if not unverifiable:
        return files
    md5s: dict[DID, str] = {}
    for chunk in _chunks([files[index].did for index in unverifiable]):
        for row in client.get_metadata_bulk(chunk):
            if row.get("md5"):
                md5s[DID(str(row["scope"]), str(row["name"]))] = str(row["md5"])
    for index in unverifiable:
        md5 = md5s.get(files[index].did)
        if md5 is not None:
            files[index] = dataclasses.replace(files[index], md5=md5)
    return files


def _did_type(value: object) -> DIDType:
    key = str(value).rsplit(".", 1)[-1].upper()
    try:
        return _DID_TYPES[key]
    except KeyError:
        raise CatalogueUnavailableError(f"the catalogue returned an unknown DID type {value!r}") from None


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(str(value))


def _timestamp(value: object) -> float:
    """POSIX seconds of rucio's naive-UTC datetimes (or their RFC 1123 text); 0.0 when absent."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.strptime(value, "%a, %d %b %Y %H:%M:%S UTC")
        except ValueError:
            return 0.0
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()
    return 0.0


def _text(value: object) -> str:
    if isinstance(value, datetime.datetime):
        return value.replace(tzinfo=value.tzinfo or datetime.UTC).isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _info_from_listing(row: Mapping[str, Any]) -> DIDInfo:
    """A row of ``list_content`` (``type``) or ``list_dids(long=True)`` (``did_type``): no times."""
    kind = _did_type(row.get("type") or row.get("did_type"))
    return DIDInfo(
        did=DID(str(row["scope"]), str(row["name"])),
        type=kind,
        size=_int_or_none(row.get("bytes")),
        adler32=(row.get("adler32") or None) if kind is DIDType.FILE else None,
        md5=(row.get("md5") or None) if kind is DIDType.FILE else None,
    )


def _info_from_file_row(row: Mapping[str, Any], scopes: dict[str, str], what: str) -> DIDInfo:
    """A row of ``list_files`` (always a file; no type, no times)."""
    try:
        scope, name = row["scope"], row["name"]
        size = row.get("bytes")
        did = DID(scopes.setdefault(scope, scope), name)
        return DIDInfo(did, DIDType.FILE, None if size is None else int(size),
                       row.get("adler32") or None, row.get("md5") or None)
    except (KeyError, TypeError, ValueError) as exc:
        raise CatalogueUnavailableError(f"{what}: a row that is not a file ({exc!r}): {row!r:.200}") from None


def _info_from_metadata(row: Mapping[str, Any]) -> DIDInfo:
    """A row of ``get_metadata``/``get_metadata_bulk`` (the DID table's columns)."""
    return DIDInfo(
        did=DID(str(row["scope"]), str(row["name"])),
        type=_did_type(row.get("did_type")),
        size=_int_or_none(row.get("bytes")),
        adler32=row.get("adler32") or None,
        md5=row.get("md5") or None,
        created_at=_timestamp(row.get("created_at")),
        updated_at=_timestamp(row.get("updated_at")),
    )
