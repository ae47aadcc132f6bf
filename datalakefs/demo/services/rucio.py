"""The Rucio server: its venv, its configs, its database schema, and its two gunicorns.

The plain http server (``rucio``) serves the API and userpass authentication; the TLS front
(``rucio-tls``) is the same app behind gunicorn's own TLS, which verifies client certificates and
RFC 3820 proxies against the demo CA for rucio's x509 and x509_proxy authentication.
"""

from __future__ import annotations

import configparser
import hashlib
import io
import shutil
import ssl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from datalakefs.demo.layout import ASSETS, DemoError, Layout, ProgressFn
from datalakefs.demo.processes import ProcessRecord, ServiceSpec, Site, clean_env, render, tail, write_atomic
from datalakefs.demo.services.postgres import psql
from datalakefs.demo.status import X509Access

RUCIO_USER: Final = "ddmlab"
RUCIO_PASSWORD: Final = "secret"
# the processes that run from the server venv: it cannot be rebuilt under them
VENV_USERS: Final = frozenset({"rucio", "rucio-tls", "daemons", "fts", "dav-auth", "dav-tls"})


def server_env(layout: Layout) -> dict[str, str]:
    """Environment of the processes that run rucio's server code (the API and the daemons)."""
    return clean_env(RUCIO_CONFIG=str(layout.server_config), X509_USER_PROXY=str(layout.x509_proxy))


# ------------------------------------------------------------------------------------------------ venv


def _venv_requirements() -> tuple[str, str]:
    requirements = (ASSETS / "server-requirements.txt").read_text()
    return requirements, hashlib.sha256(requirements.encode()).hexdigest()


def _venv_current(layout: Layout) -> bool:
    marker = layout.venv / ".datalakefs-requirements"
    return (
        marker.exists()
        and marker.read_text().strip() == _venv_requirements()[1]
        and (layout.venv / "bin" / "gunicorn").exists()
    )


def ensure_venv(layout: Layout, step: ProgressFn, running: Mapping[str, ProcessRecord]) -> None:
    """Build the server venv unless it exists for exactly these pinned requirements."""
    if _venv_current(layout):
        return
    venv_users = sorted(set(running) & VENV_USERS)
    if venv_users:
        raise DemoError(
            f"the server venv must be rebuilt (its pinned requirements changed) but {', '.join(venv_users)} "
            "run from it: run `datalakefs demo down` first"
        )
    venv = layout.venv
    requirements, digest = _venv_requirements()
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    step(f"creating the Rucio server venv in {venv} (one time, about 30 s)")
    if venv.exists():
        shutil.rmtree(venv)
    req_file = layout.lib / "server-requirements.txt"
    req_file.write_text(requirements)
    log = layout.log / "venv.log"
    with open(log, "w") as fh:
        rc = subprocess.run(
            [python, "-m", "venv", str(venv)], stdout=fh, stderr=subprocess.STDOUT, check=False
        ).returncode
        if rc == 0:
            rc = subprocess.run(
                [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", "-r", str(req_file)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                check=False,
                env=clean_env(keep_proxies=True),
            ).returncode
    if rc != 0 or not (venv / "bin" / "gunicorn").exists():
        raise DemoError(f"could not build the server venv (rc {rc}); see {log}:\n{tail(log)}")
    (venv / ".datalakefs-requirements").write_text(digest + "\n")
    step("server venv ready")


def _site_packages(layout: Layout) -> Path:
    found = sorted(layout.venv.glob("lib/python3*/site-packages/rucio"))
    if not found:
        raise DemoError(f"rucio is missing from the server venv {layout.venv}: delete it and run up again")
    return found[-1]


# --------------------------------------------------------------------------------------------- configs


def write_configs(site: Site) -> None:
    """rucio.cfg of the server (with a client section), of clients, and alembic.ini."""
    layout, p = site.layout, site.ports
    db_url = f"postgresql+psycopg://rucio:rucio@127.0.0.1:{p['postgres']}/rucio"
    client_section = render(
        "rucio-client.cfg.in",
        rucio_port=p["rucio"],
        username=RUCIO_USER,
        password=RUCIO_PASSWORD,
        run=layout.run,
    )
    write_atomic(layout.client_config, client_section, 0o600)
    write_atomic(
        layout.server_config,
        render(
            "rucio-server.cfg.in",
            log=layout.log,
            venv=layout.venv,
            db_url=db_url,
            username=RUCIO_USER,
            password=RUCIO_PASSWORD,
            etc=layout.etc,
            client_section=client_section,
        ),
        0o600,
    )
    template = (layout.venv / "rucio" / "etc" / "alembic.ini.template").read_text()
    logging_sections = template[template.index("[loggers]") :]
    write_atomic(
        layout.etc / "alembic.ini",
        f"[alembic]\nscript_location = {_site_packages(layout)}/db/sqla/migrate_repo/\n"
        f"sqlalchemy.url = {db_url}\n\n{logging_sections}",
    )


def x509_client_config(layout: Layout, access: X509Access, *, proxy: bool) -> str:
    """The lake's rucio.cfg for ``x509`` auth (user certificate and key), or ``x509_proxy`` auth
    (the RFC 3820 proxy) when ``proxy``: authentication at the TLS front, the API at plain http."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(layout.client_config)
    client = parser["client"]
    for key in ("username", "password", "auth_token_file_path"):  # the token file holds userpass's token
        client.pop(key, None)
    client["auth_host"] = access.auth_host
    client["ca_cert"] = str(access.ca_cert)
    if proxy:
        client["auth_type"] = "x509_proxy"
        client["client_x509_proxy"] = str(access.proxy)
    else:
        client["auth_type"] = "x509"
        client["client_cert"] = str(access.user_cert)
        client["client_key"] = str(access.user_key)
    text = io.StringIO()
    parser.write(text)
    return f"# rucio.cfg for {client['auth_type']} auth at the demo lake's TLS front\n{text.getvalue()}"


def ensure_database(site: Site, step: ProgressFn) -> None:
    """The rucio database, its schema and root account (once: a marker file records it)."""
    layout = site.layout
    marker = layout.pg / "bootstrapped"
    if marker.exists():
        return
    if psql(site, "select 1 from pg_roles where rolname = 'rucio'") != "1":
        psql(site, "create user rucio password 'rucio'")
    if psql(site, "select 1 from pg_database where datname = 'rucio'") != "1":
        psql(site, "create database rucio owner rucio")
    log = layout.log / "bootstrap.log"
    with open(log, "w") as fh:
        rc = subprocess.run(
            [str(layout.venv / "bin" / "python"), str(layout.lib / "bootstrap.py")],
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=False,
            env=clean_env(RUCIO_CONFIG=str(layout.server_config)),
        ).returncode
    if rc != 0:
        raise DemoError(f"the Rucio schema bootstrap failed (rc {rc}); see {log}:\n{tail(log)}")
    marker.write_text("rucio schema, VO def and account root created\n")
    step("Rucio schema and root account created")


# ------------------------------------------------------------------------------------------- processes


def _gunicorn(site: Site, name: str, port_key: str, app: str, *, workers: int, extra: Sequence[str] = ()) -> list[str]:
    """argv of a gunicorn serving ``app`` on ``port_key``, logging to log/<name>-{access,server}.log."""
    log = site.layout.log
    return [
        str(site.layout.venv / "bin" / "gunicorn"),
        *extra,
        "--bind", f"127.0.0.1:{site.ports[port_key]}",
        "--workers", str(workers),
        "--threads", "4",
        "--timeout", "300",
        "--graceful-timeout", "3",
        "--no-control-socket",
        "--access-logfile", str(log / f"{name}-access.log"),
        "--error-logfile", str(log / f"{name}-server.log"),
        app,
    ]


def start_server(site: Site, _step: ProgressFn) -> None:
    argv = _gunicorn(site, "rucio", "rucio", "rucio.web.rest.flaskapi.v1.main:application", workers=2)
    site.spawn("rucio", argv, cwd=site.layout.run, env=server_env(site.layout))


def start_tls_front(site: Site, _step: ProgressFn) -> None:
    layout = site.layout
    x509 = layout.x509
    tls = [
        "--config", str(layout.lib / "rucio_tls_gunicorn.py"),
        "--pythonpath", str(layout.lib),
        "--certfile", str(x509.host_cert),
        "--keyfile", str(x509.host_key),
        "--ca-certs", str(x509.ca_cert),
        "--cert-reqs", str(int(ssl.CERT_OPTIONAL)),
    ]
    argv = _gunicorn(site, "rucio-tls", "rucio_https", "rucio_x509_front:application", workers=1, extra=tls)
    site.spawn("rucio-tls", argv, cwd=layout.run, env=server_env(layout))


SERVER = ServiceSpec(
    "rucio", "Rucio REST server (gunicorn)", ("rucio",), start_server, http_path="/ping", depends_on=("postgres",)
)
TLS_FRONT = ServiceSpec(
    "rucio-tls",
    "Rucio REST server, https with client certificates (x509 auth)",
    ("rucio_https",),
    start_tls_front,
    http_path="/ping",
    depends_on=("postgres",),
)
