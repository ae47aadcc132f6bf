"""XRootD: the origin of LAKE-ORIGIN, the two XCaches in front of it, and the token origin.

Each serves root:// and XrdHttp http:// on two ports. The token origin serves the same tree but
requires a WLCG token (XrdAccSciTokens), whose offline issuer's keys are pre-loaded into
scitokens-cpp's key cache.
"""

from __future__ import annotations

from collections.abc import Callable

from datalakefs.demo.layout import TOKEN_AUDIENCE, TOKEN_ISSUER, ProgressFn
from datalakefs.demo.processes import ServiceSpec, Site, clean_env, require


def write_configs(site: Site) -> None:
    """Configs of the origin, of both XCaches and of the token origin."""
    layout, p = site.layout, site.ports
    site.configure("xrootd-origin.cfg", "xrootd-origin.cfg.in", rse=layout.rse, admin=layout.xrd_run,
                   root_port=p["origin_root"], http_port=p["origin_http"])
    for name, cache_dir, origin, root_key, http_key in (
        ("xcache", layout.xcache, f"localhost:{p['origin_root']}", "xcache_root", "xcache_http"),
        ("xcache-fwd", layout.xcache_fwd, "=", "xcache_fwd_root", "xcache_fwd_http"),
    ):
        site.configure(f"xrootd-{name}.cfg", "xrootd-xcache.cfg.in", admin=layout.xrd_run, root_port=p[root_key],
                       http_port=p[http_key], origin=origin, cache_dir=cache_dir)
    site.configure("scitokens.cfg", "scitokens.cfg.in", audience=TOKEN_AUDIENCE, issuer=TOKEN_ISSUER)
    site.configure("xrootd-origin-token.cfg", "xrootd-token.cfg.in", rse=layout.rse, admin=layout.xrd_run,
                   root_port=p["token_root"], http_port=p["token_http"], scitokens_cfg=layout.etc / "scitokens.cfg")


def _start(site: Site, name: str, env: dict[str, str], *, supervised: bool = False) -> None:
    """Start XRootD ``name``; ``supervised``: under lib/supervise.py, which starts it again after a
    crash (XCache 5.5.3 segfaults now and then under storms of small reads)."""
    xrootd_user = ["-R", site.run_as.xrootd] if site.run_as.xrootd else []
    argv = [require("xrootd"), *xrootd_user, "-c", str(site.layout.etc / f"xrootd-{name}.cfg"), "-n", name]
    if supervised:
        layout = site.layout
        argv = [str(layout.venv / "bin" / "python"), str(layout.lib / "supervise.py"), "--name", name, "--", *argv]
    site.spawn(name, argv, cwd=site.layout.xrd_run, env=env)


def _plain(name: str, *, supervised: bool = False) -> Callable[[Site, ProgressFn], None]:
    """The start of an XRootD that needs nothing from the environment."""

    def start(site: Site, _step: ProgressFn) -> None:
        _start(site, name, clean_env(), supervised=supervised)

    return start


ORIGIN = ServiceSpec(
    "origin", "XRootD origin of LAKE-ORIGIN", ("origin_root", "origin_http"), _plain("origin")
)
XCACHE = ServiceSpec(
    "xcache",
    "XCache, fixed origin",
    ("xcache_root", "xcache_http"),
    _plain("xcache", supervised=True),
    depends_on=("origin",),
)
XCACHE_FWD = ServiceSpec(
    "xcache-fwd",
    "XCache, forwarding mode",
    ("xcache_fwd_root", "xcache_fwd_http"),
    _plain("xcache-fwd", supervised=True),
    depends_on=("origin",),
)


def _start_token_origin(site: Site, _step: ProgressFn) -> None:
    _start(site, "origin-token", clean_env(XDG_CACHE_HOME=str(site.layout.token_cache)))


TOKEN_ORIGIN = ServiceSpec(
    "origin-token",
    "XRootD origin of LAKE-ORIGIN, bearer token required",
    ("token_root", "token_http"),
    _start_token_origin,
)
