"""The demo lake's X.509 credentials: a CA, a user certificate and a real RFC 3820 proxy, made once."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from datalakefs.demo.x509 import USER_DN, X509Files, ensure_credentials

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> X509Files:
    assert OPENSSL is not None
    files = X509Files(tmp_path_factory.mktemp("x509") / "x509")
    assert ensure_credentials(files, OPENSSL)
    return files


def test_the_proxy_is_an_rfc3820_proxy_of_the_user_certificate(made: X509Files) -> None:
    subject = openssl("x509", "-in", str(made.proxy), "-noout", "-subject", "-nameopt", "compat").stdout
    assert subject.strip().startswith(f"subject={USER_DN}/CN=")
    assert subject.strip().rpartition("/CN=")[2].isdigit()
    extensions = openssl("x509", "-in", str(made.proxy), "-noout", "-ext", "proxyCertInfo").stdout
    assert "Proxy Certificate Information: critical" in extensions
    assert "Inherit all" in extensions
    pem = made.proxy.read_text()
    assert pem.count("BEGIN CERTIFICATE") == 2 and pem.count("PRIVATE KEY-----") == 2  # cert, key, user cert
    assert pem.endswith(made.user_cert.read_text())
    chain = ["-CAfile", str(made.ca_cert), "-untrusted", str(made.user_cert), str(made.proxy)]
    assert openssl("verify", "-allow_proxy_certs", *chain).returncode == 0
    refused = openssl("verify", *chain)
    assert "proxy certificates not allowed" in refused.stdout + refused.stderr  # why the front sets the flag


def test_keys_are_private(made: X509Files) -> None:
    assert stat.S_IMODE(made.directory.stat().st_mode) == 0o700
    for key in (made.ca_key, made.host_key, made.user_key, made.proxy):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_the_front_certificate_is_for_loopback_and_from_the_ca(made: X509Files) -> None:
    assert openssl("verify", "-CAfile", str(made.ca_cert), str(made.host_cert)).returncode == 0
    names = openssl("x509", "-in", str(made.host_cert), "-noout", "-ext", "subjectAltName").stdout
    assert "IP Address:127.0.0.1" in names


def test_made_once_and_a_missing_proxy_is_remade(made: X509Files, tmp_path: Path) -> None:
    assert OPENSSL is not None
    before = {p: p.read_bytes() for p in (made.ca_cert, made.user_cert, made.proxy)}
    assert not ensure_credentials(made, OPENSSL)
    assert {p: p.read_bytes() for p in before} == before
    made.proxy.unlink()
    assert ensure_credentials(made, OPENSSL)
    assert made.proxy.read_bytes() != before[made.proxy]
    assert made.user_cert.read_bytes() == before[made.user_cert]
