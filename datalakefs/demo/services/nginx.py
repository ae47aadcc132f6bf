"""nginx: the WebDAV doors of the RSE tree (https and http) and the bearer-token guard of the XCache.

The WebDAV server is the https door of SCRATCH and LAKE-ORIGIN (uploads, deletions, third-party
copies) with a plain http twin. The guard checks each request by a HEAD of the same path at the
token origin, then proxies it to the XCache without the token.
"""

from __future__ import annotations

import os
import subprocess

from datalakefs.demo.layout import ProgressFn
from datalakefs.demo.processes import ServiceSpec, Site, clean_env, render, require, write_atomic


def _user_directive() -> str:
    return "user root;" if os.geteuid() == 0 else ""


def write_configs(site: Site) -> None:
    """The WebDAV server's self-signed certificate and config, and the guard's config."""
    layout, p = site.layout, site.ports
    if not (layout.etc / "dav.crt").exists() or not (layout.etc / "dav.key").exists():
        subprocess.run(
            [
                require("openssl"),
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "3650",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout",
                str(layout.etc / "dav.key"),
                "-out",
                str(layout.etc / "dav.crt"),
            ],
            capture_output=True,
            check=True,
        )
    # rucio's webdav protocol refuses to work without an X509 proxy file and presents it as TLS
    # client certificate; nginx never asks for one, so any well-formed cert+key PEM will do.
    write_atomic(
        layout.x509_proxy,
        (layout.etc / "dav.crt").read_text() + (layout.etc / "dav.key").read_text(),
        0o600,
    )
    write_atomic(
        layout.etc / "nginx.conf",
        render(
            "nginx.conf.in",
            user_directive=_user_directive(),
            run=layout.run,
            log=layout.log,
            etc=layout.etc,
            rse=layout.rse,
            dav_https=p["dav_https"],
            dav_http=p["dav_http"],
        ),
    )
    write_atomic(
        layout.etc / "nginx-guard.conf",
        render(
            "nginx-guard.conf.in",
            user_directive=_user_directive(),
            run=layout.run,
            log=layout.log,
            guard_http=p["guard_http"],
            token_http=p["token_http"],
            xcache_http=p["xcache_http"],
        ),
    )


def _start(site: Site, name: str, config: str, error_log: str) -> None:
    layout = site.layout
    site.spawn(
        name,
        [require("nginx"), "-p", f"{layout.run}/", "-e", str(layout.log / error_log), "-c", str(layout.etc / config)],
        cwd=layout.run,
        env=clean_env(),
    )


def _start_dav(site: Site, _step: ProgressFn) -> None:
    _start(site, "dav", "nginx.conf", "nginx-error.log")


def _start_guard(site: Site, _step: ProgressFn) -> None:
    _start(site, "guard", "nginx-guard.conf", "guard-error.log")


GUARD = ServiceSpec(
    "guard",
    "nginx bearer-token guard in front of the XCache",
    ("guard_http",),
    _start_guard,
    depends_on=("origin-token",),
)
DAV = ServiceSpec("dav", "nginx WebDAV (SCRATCH, LAKE-ORIGIN https)", ("dav_https", "dav_http"), _start_dav)
