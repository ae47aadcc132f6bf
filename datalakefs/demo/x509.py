"""The demo lake's X.509 world: a CA, a user certificate and an RFC 3820 proxy derived from it.

Rucio's ``x509`` and ``x509_proxy`` authentication need a client certificate that a TLS server
verifies against a CA it trusts; the lake's TLS front for the Rucio server (gunicorn with TLS, see
``assets/rucio_x509_front.py``) trusts exactly this CA. Everything is made with ``openssl``:

* the CA, the TLS front's server certificate (for 127.0.0.1 and localhost, so clients verify the
  front with the same CA file) and the user certificate are made once and reused (their DN is registered as an X509
  identity of the lake's root account by the seed, so a new CA would only cost a re-seed);
* the proxy is a real RFC 3820 proxy: issued by the user certificate, subject = user DN +
  ``/CN=<serial>``, a critical ``proxyCertInfo`` (language ``id-ppl-inheritAll``), in one PEM file
  (proxy certificate, its key, the user certificate) of mode 0600, as ``voms-proxy-init`` writes it.
  It is remade when it is missing or expires within a day (it is valid for 30 days);
* private keys are 0600, in a 0700 directory.

OpenSSL refuses proxy certificates unless the verifier sets ``X509_V_FLAG_ALLOW_PROXY_CERTS``
(OpenSSL 3 ignores the old ``OPENSSL_ALLOW_PROXY_CERTS`` environment switch), which the front does.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: The user's DN in the slash form grid tools print and Rucio stores (``rucio-admin identity add``);
#: the TLS front passes the client DN in this form (nginx's ``$ssl_client_s_dn_legacy``).
USER_DN: Final = "/O=datalakefs demo lake/CN=Demo User"
CA_DN: Final = "/O=datalakefs demo lake/CN=Demo Lake CA"
HOST_DN: Final = "/O=datalakefs demo lake/CN=127.0.0.1"
IDENTITY_EMAIL: Final = "demo@localhost"
PROXY_DAYS: Final = 30
_RENEW_BEFORE_SECONDS: Final = 86400

_USER_EXTENSIONS: Final = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
)
_HOST_EXTENSIONS: Final = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
)
_PROXY_EXTENSIONS: Final = (
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "proxyCertInfo=critical,language:id-ppl-inheritAll\n"
)


class X509Error(Exception):
    """openssl failed to make a credential; the message has its output."""


@dataclass(frozen=True, slots=True)
class X509Files:
    """Where the lake keeps its X.509 credentials (``directory`` is private to the lake's owner)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def host_cert(self) -> Path:
        return self.directory / "hostcert.pem"

    @property
    def host_key(self) -> Path:
        return self.directory / "hostkey.pem"

    @property
    def user_cert(self) -> Path:
        return self.directory / "usercert.pem"

    @property
    def user_key(self) -> Path:
        return self.directory / "userkey.pem"

    @property
    def proxy(self) -> Path:
        """Proxy certificate + its key + the user certificate, one PEM file (``X509_USER_PROXY``)."""
        return self.directory / "x509up"


def ensure_credentials(files: X509Files, openssl: str) -> bool:
    """Make what is missing (CA, user certificate, proxy); True when anything was made."""
    files.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(files.directory, 0o700)
    made = False
    if not (files.ca_cert.exists() and files.ca_key.exists()):
        _run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", CA_DN,
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", str(files.ca_key), "-out", str(files.ca_cert))
        files.user_cert.unlink(missing_ok=True)
        files.host_cert.unlink(missing_ok=True)
        made = True
    if not (files.host_cert.exists() and files.host_key.exists()):
        _issue(openssl, files.directory, subject=HOST_DN, issuer_cert=files.ca_cert, issuer_key=files.ca_key,
               extensions=_HOST_EXTENSIONS, days=3650, cert=files.host_cert, key=files.host_key)
        made = True
    if not (files.user_cert.exists() and files.user_key.exists()):
        _issue(openssl, files.directory, subject=USER_DN, issuer_cert=files.ca_cert, issuer_key=files.ca_key,
               extensions=_USER_EXTENSIONS, days=3650, cert=files.user_cert, key=files.user_key)
        files.proxy.unlink(missing_ok=True)
        made = True
    if not _valid_for_a_day(openssl, files.proxy):
        _make_proxy(openssl, files)
        made = True
    for key in (files.ca_key, files.host_key, files.user_key, files.proxy):
        os.chmod(key, 0o600)
    return made


def _make_proxy(openssl: str, files: X509Files) -> None:
    serial = secrets.randbelow(2**31 - 1) + 1
    work = files.directory / "proxy.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        cert, key = work / "proxy.pem", work / "proxy.key"
        _issue(openssl, work, subject=f"{USER_DN}/CN={serial}", issuer_cert=files.user_cert,
               issuer_key=files.user_key, extensions=_PROXY_EXTENSIONS, days=PROXY_DAYS, cert=cert, key=key,
               serial=serial)
        bundle = work / "bundle"
        with open(os.open(bundle, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(cert.read_text() + key.read_text() + files.user_cert.read_text())
        os.replace(bundle, files.proxy)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _issue(openssl: str, work: Path, *, subject: str, issuer_cert: Path, issuer_key: Path, extensions: str,
           days: int, cert: Path, key: Path, serial: int | None = None) -> None:
    """A new key and a certificate for ``subject`` signed by ``issuer_cert``/``issuer_key``."""
    csr, ext = work / f"{cert.name}.csr", work / f"{cert.name}.ext"
    ext.write_text(extensions)
    try:
        _run(openssl, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
             "-keyout", str(key), "-out", str(csr))
        _run(openssl, "x509", "-req", "-in", str(csr), "-CA", str(issuer_cert), "-CAkey", str(issuer_key),
             "-set_serial", str(serial if serial is not None else secrets.randbits(63)), "-days", str(days),
             "-extfile", str(ext), "-out", str(cert))
    finally:
        csr.unlink(missing_ok=True)
        ext.unlink(missing_ok=True)


def _valid_for_a_day(openssl: str, cert: Path) -> bool:
    if not cert.exists():
        return False
    done = subprocess.run([openssl, "x509", "-in", str(cert), "-noout", "-checkend", str(_RENEW_BEFORE_SECONDS)],
                          capture_output=True, check=False)
    return done.returncode == 0


def _run(openssl: str, *args: str) -> None:
    done = subprocess.run([openssl, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise X509Error(f"openssl {args[0]} failed (rc {done.returncode}): {done.stderr.strip()[-2000:]}")
