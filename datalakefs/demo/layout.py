"""Where the demo lake keeps things: its state directory layout, port table and fixed names.

Every service listens on 127.0.0.1 at ``port_base + offset`` (xrootd cannot bind one address: it
listens on ``*`` and accepts loopback clients only, ``xrd.allow host localhost``):

    offset  port key          service     what
    ------  ----------------  ----------  -------------------------------------------------------
       0    rucio             rucio       Rucio REST server (gunicorn), http
       1    dav_https         dav-tls     the WebDAV https door (SCRATCH; LAKE-ORIGIN's write door): TLS
                                          that verifies client certificates and proxies, then nginx
       2    fts               fts         FTS3-REST test shim, http
       3    dav_http          dav         the same nginx, plain http
       4    postgres          postgres    PostgreSQL (private cluster)
       5    rucio_https       rucio-tls   the Rucio server app again, https (a second gunicorn): it
                                          verifies client certificates and proxies against the demo
                                          CA, for rucio's x509 and x509_proxy auth
       6    dav_auth          dav-auth    the WebDAV doors' write authoriser (token or certificate)
      10    origin_root       origin      XRootD origin of LAKE-ORIGIN, root://
      11    origin_http       origin      the same origin, http (XrdHttp)
      12    xcache_root       xcache      XCache in front of the origin (fixed origin), root://
      13    xcache_http       xcache      the same XCache, http
      14    xcache_fwd_root   xcache-fwd  XCache in forwarding mode (root-proxy-internal), root://
      15    xcache_fwd_http   xcache-fwd  the same XCache, http
      16    token_root        origin-token XRootD origin of the same tree, SciTokens required, root://
      17    token_http        origin-token the same, http (bearer token required: 403 without one)
      18    guard_http        guard       nginx bearer-token guard in front of the XCache, http
      --    --                daemons     Rucio's conveyor/judge/reaper daemons in a loop

Everything lives under one state directory (``Layout``): the server venv, configs, logs, pid files,
the PostgreSQL cluster, the RSE trees and the XCache disks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from datalakefs.demo.x509 import X509Files

DEFAULT_STATE_DIR: Final = ".demo"
DEFAULT_PORT_BASE: Final = 38000
STATE_ENV: Final = "DATALAKEFS_DEMO_STATE"

PORT_OFFSETS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "rucio": 0,
        "dav_https": 1,
        "fts": 2,
        "dav_http": 3,
        "postgres": 4,
        "rucio_https": 5,
        "dav_auth": 6,
        "origin_root": 10,
        "origin_http": 11,
        "xcache_root": 12,
        "xcache_http": 13,
        "xcache_fwd_root": 14,
        "xcache_fwd_http": 15,
        "token_root": 16,
        "token_http": 17,
        "guard_http": 18,
    }
)
MAX_OFFSET: Final = max(PORT_OFFSETS.values())

ORIGIN_RSE: Final = "LAKE-ORIGIN"
SCRATCH_RSE: Final = "SCRATCH"
HEARTBEAT_MAX_AGE: Final = 120.0
TOKEN_ISSUER: Final = "https://issuer.demo-lake.invalid"
TOKEN_AUDIENCE: Final = "https://datalakefs.demo-lake"
SEED_FILE_VERSION: Final = 1

ASSETS: Final = Path(__file__).with_name("assets")
ProgressFn = Callable[[str], None]


class DemoError(Exception):
    """A failure of the demo tooling; the message says what to do about it."""




@dataclass(frozen=True, slots=True)
class Layout:
    """Paths inside the state directory (``root`` is absolute)."""

    root: Path

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def lib(self) -> Path:
        """Copies of the assets the lake's own processes run (the lake does not depend on the source tree)."""
        return self.root / "lib"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def xrd_run(self) -> Path:
        return self.run / "xrootd"

    @property
    def pg(self) -> Path:
        return self.root / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg / "data"

    @property
    def rse(self) -> Path:
        """Root of nginx and of the XRootD origin: ``rse/<RSE>/`` is that RSE's prefix."""
        return self.root / "rse"

    @property
    def origin(self) -> Path:
        return self.rse / ORIGIN_RSE

    @property
    def scratch(self) -> Path:
        return self.rse / SCRATCH_RSE

    @property
    def xcache(self) -> Path:
        return self.root / "xcache"

    @property
    def xcache_fwd(self) -> Path:
        return self.root / "xcache-fwd"

    @property
    def token_key(self) -> Path:
        """The offline token issuer's private key (only the lake's owner reads it)."""
        return self.etc / "token-issuer.pem"

    @property
    def token_cache(self) -> Path:
        """``XDG_CACHE_HOME`` of the token origin: scitokens-cpp's pre-filled key cache."""
        return self.root / "token-cache"

    @property
    def mount_cache(self) -> Path:
        return self.root / "mount" / "cache"

    @property
    def mount_state(self) -> Path:
        return self.root / "mount" / "state"

    @property
    def server_config(self) -> Path:
        return self.etc / "rucio.cfg"

    @property
    def client_config(self) -> Path:
        return self.etc / "rucio-client.cfg"

    @property
    def x509_proxy(self) -> Path:
        """The demo user's RFC 3820 proxy: what the lake's clients present to the WebDAV doors."""
        return self.x509.proxy

    @property
    def dav_front(self) -> Path:
        """nginx's socket behind the https door, in a directory only the lake's owner enters."""
        return self.run / "dav-front" / "nginx.sock"

    @property
    def user_token(self) -> Path:
        """The bearer token `datalakefs demo mount` presents (read everything, write SCRATCH)."""
        return self.etc / "bt_demo"

    @property
    def service_token(self) -> Path:
        """A bearer token the FTS shim sends to the storage (read, create, modify all of it)."""
        return self.etc / "fts-token"

    @property
    def x509(self) -> X509Files:
        """The demo CA, the TLS front's certificate, the user certificate and its RFC 3820 proxy."""
        return X509Files(self.etc / "x509")

    @property
    def datalakefs_config(self) -> Path:
        return self.etc / "datalakefs.toml"

    @property
    def knobs(self) -> Path:
        return self.etc / "fts-knobs.json"

    @property
    def lake_file(self) -> Path:
        """``{"port_base": N}`` of the last ``up``: down/status find the ports without options."""
        return self.root / "lake.json"

    @property
    def seed_file(self) -> Path:
        return self.root / "seed.json"

    @property
    def mount_file(self) -> Path:
        return self.run / "mount.json"

    @property
    def heartbeat(self) -> Path:
        return self.run / "daemons.heartbeat"

    def pid_file(self, service: str) -> Path:
        return self.run / f"{service}.pid"


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR)


def ports_for(port_base: int) -> dict[str, int]:
    return {key: port_base + offset for key, offset in PORT_OFFSETS.items()}


def check_port_base(port_base: int) -> None:
    if not 1024 <= port_base <= 65535 - MAX_OFFSET:
        raise DemoError(f"--port-base must be between 1024 and {65535 - MAX_OFFSET}, not {port_base}")

