"""nginx: the WebDAV doors of the RSE tree (https and http), their write authoriser, and the
bearer-token guard of the XCache.

The WebDAV server is the https door of SCRATCH and LAKE-ORIGIN (uploads, deletions, third-party
copies) with a plain http twin. Reads are anonymous; every change is first put to the authoriser
(``assets/dav_auth.py``), which accepts a WLCG token with ``storage.create``/``storage.modify``
for the path or a client certificate of the demo CA, and answers 401 without a credential. The
https door's TLS is ``assets/dav_tls_front.py`` (nginx cannot verify RFC 3820 proxies): it verifies
the client certificate and passes each request on to nginx's internal socket with the subject. The
guard checks each request by a HEAD of the same path at the token origin, then proxies it to the
XCache without the token.
"""

from __future__ import annotations

import os
import subprocess

from datalakefs.demo.layout import TOKEN_AUDIENCE, TOKEN_ISSUER, ProgressFn
from datalakefs.demo.processes import ServiceSpec, Site, clean_env, require


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
    common = {"user_directive": _user_directive(), "run": layout.run, "log": layout.log}
    site.configure("nginx.conf", "nginx.conf.in", **common, rse=layout.rse, dav_http=p["dav_http"],
                   dav_front=layout.dav_front, dav_auth=p["dav_auth"])
    site.configure("nginx-guard.conf", "nginx-guard.conf.in", **common, guard_http=p["guard_http"],
                   token_http=p["token_http"], xcache_http=p["xcache_http"])


def _start(site: Site, name: str, config: str, error_log: str) -> None:
    layout = site.layout
    site.spawn(
        name,
        [require("nginx"), "-p", f"{layout.run}/", "-e", str(layout.log / error_log), "-c", str(layout.etc / config)],
        cwd=layout.run,
        env=clean_env(),
    )


def _start_authoriser(site: Site, _step: ProgressFn) -> None:
    layout = site.layout
    site.spawn_script("dav-auth", "dav_auth.py", port=site.ports["dav_auth"], key=layout.token_key,
                      issuer=TOKEN_ISSUER, audience=TOKEN_AUDIENCE, log=layout.log / "dav-auth.log")


def _start_tls_front(site: Site, _step: ProgressFn) -> None:
    layout = site.layout
    site.spawn_script("dav-tls", "dav_tls_front.py", port=site.ports["dav_https"], backend=layout.dav_front,
                      cert=layout.etc / "dav.crt", key=layout.etc / "dav.key", ca=layout.x509.ca_cert,
                      log=layout.log / "dav-tls.log")


def _start_dav(site: Site, _step: ProgressFn) -> None:
    site.layout.dav_front.parent.mkdir(mode=0o700, exist_ok=True)
    site.layout.dav_front.unlink(missing_ok=True)  # left by an nginx that was killed
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
AUTHORISER = ServiceSpec(
    "dav-auth", "WebDAV write authoriser (WLCG token or demo certificate)", ("dav_auth",), _start_authoriser
)
DAV = ServiceSpec(
    "dav",
    "nginx WebDAV (SCRATCH, LAKE-ORIGIN); changes need a credential",
    ("dav_http",),
    _start_dav,
    depends_on=("dav-auth",),
)
TLS_FRONT = ServiceSpec(
    "dav-tls",
    "WebDAV https door: verifies client certificates and proxies, then nginx",
    ("dav_https",),
    _start_tls_front,
    depends_on=("dav",),
)
