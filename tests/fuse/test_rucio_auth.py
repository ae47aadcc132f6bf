"""Catalogue authentication from the user's rucio.cfg, with rucio's token cache kept per mount
(issue 8, SPEC §6)."""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from datalakefs.demo.status import LakeStatus
from tests.fuse.mounting import Mount, datalakefs

pytestmark = [pytest.mark.lake, pytest.mark.fuse]


def rucio_cfg(lake: LakeStatus, path: Path, **client: str | None) -> Path:
    """The lake's rucio.cfg with ``client`` keys changed (None removes a key)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(lake.rucio_config)
    for key, value in client.items():
        if value is None:
            parser.remove_option("client", key)
        else:
            parser.set("client", key, value)
    with open(path, "w") as fh:
        parser.write(fh)
    os.chmod(path, 0o600)
    return path


def private_dir(mount: Mount) -> Path:
    state = Path(mount.options[1].partition("=")[2])
    return state / "mounts" / hashlib.sha256(str(mount.mountpoint.absolute()).encode()).hexdigest()[:16]


def test_userpass_token_is_cached_per_mount(
    lake: LakeStatus, new_mount: Callable[..., Mount], tmp_path: Path
) -> None:
    config = rucio_cfg(lake, tmp_path / "rucio.cfg", auth_token_file_path=None)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    password = parser.get("client", "password")
    first = new_mount(f"rucio_config={config}", "log_level=DEBUG")
    second = new_mount(f"rucio_config={config}")
    for mount in (first, second):
        mount.start()
        assert set(lake.seed.scopes) <= set(os.listdir(mount.mountpoint))
    tokens = [private_dir(mount) / "rucio" / "auth_token_for_account_root" for mount in (first, second)]
    assert all(token.is_file() for token in tokens)
    assert tokens[0].read_text() != tokens[1].read_text()  # each mount authenticated for itself
    assert (tokens[0].parent.stat().st_mode & 0o077) == 0  # rucio keeps the directory private
    first.stop()
    log = "".join(p.read_text() for p in (Path(first.options[1].partition("=")[2]) / "logs").glob("*.log"))
    assert "X-Rucio-Password: [hidden]" in log  # rucio's client logged its request headers at DEBUG...
    assert f"X-Rucio-Password: {password}" not in log  # ...without the password or the token
    assert tokens[0].read_text().strip() not in log


def test_oidc_with_a_token_file(
    lake: LakeStatus, rucio_client: Any, new_mount: Callable[..., Mount], tmp_path: Path
) -> None:
    token_file = tmp_path / "rucio-token"
    token_file.write_text(rucio_client.auth_token)  # a token another tool obtained and refreshes
    os.chmod(token_file, 0o600)
    config = rucio_cfg(lake, tmp_path / "rucio.cfg", auth_type="oidc", username=None, password=None,
                       auth_token_file_path=str(token_file))
    mount = new_mount(f"rucio_config={config}")
    mount.start()
    assert set(lake.seed.scopes) <= set(os.listdir(mount.mountpoint))
    assert not (private_dir(mount) / "rucio").exists()  # the configured token file is used as it is


def test_refused_credentials_stop_the_mount_without_the_password_in_any_text(
    lake: LakeStatus, new_mount: Callable[..., Mount], tmp_path: Path
) -> None:
    """Refused at mount time (issue 15: not a mount that answers every call with an error)."""
    config = rucio_cfg(lake, tmp_path / "rucio.cfg", auth_token_file_path=None, password="not-the-password-123")
    mount = new_mount(f"rucio_config={config}", "log_level=DEBUG")
    with pytest.raises(AssertionError) as refused:
        mount.start()
    assert not mount.is_mounted()
    logs = "".join(p.read_text() for p in (Path(mount.options[1].partition("=")[2]) / "logs").glob("*.log"))
    assert "refused our credentials" in str(refused.value) and "refused our credentials" in logs
    assert "not-the-password-123" not in logs + str(refused.value)


def x509_cfg(lake: LakeStatus, path: Path, **client: str | None) -> Path:
    """The lake's rucio.cfg authenticating at the TLS front (the API stays on plain http)."""
    assert lake.x509 is not None
    return rucio_cfg(lake, path, username=None, password=None, auth_token_file_path=None,
                     auth_host=lake.x509.auth_host, ca_cert=str(lake.x509.ca_cert), **client)


def front_log(lake: LakeStatus) -> str:
    return (lake.paths["log"] / "rucio-tls-access.log").read_text()


def test_x509_certificate_and_key_token_cached_per_mount(
    lake: LakeStatus, new_mount: Callable[..., Mount], tmp_path: Path
) -> None:
    assert lake.x509 is not None
    config = x509_cfg(lake, tmp_path / "rucio.cfg", auth_type="x509", client_cert=str(lake.x509.user_cert),
                      client_key=str(lake.x509.user_key))
    granted_before = front_log(lake).count('"GET /auth/x509 HTTP/1.1" 200')
    first = new_mount(f"rucio_config={config}")
    second = new_mount(f"rucio_config={config}")
    for mount in (first, second):
        mount.start()
        assert set(lake.seed.scopes) <= set(os.listdir(mount.mountpoint))
    assert front_log(lake).count('"GET /auth/x509 HTTP/1.1" 200') >= granted_before + 2  # one per mount
    tokens = [private_dir(mount) / "rucio" / "auth_token_for_account_root" for mount in (first, second)]
    assert all(token.is_file() for token in tokens)
    assert tokens[0].read_text() != tokens[1].read_text()


def test_x509_proxy_from_the_demo_rucio_cfg(
    lake: LakeStatus, new_mount: Callable[..., Mount], tmp_path: Path
) -> None:
    assert lake.x509 is not None
    proxy = lake.x509.proxy
    assert stat.S_IMODE(proxy.stat().st_mode) == 0o600
    text = subprocess.run(["openssl", "x509", "-in", str(proxy), "-noout", "-subject", "-ext", "proxyCertInfo"],
                          capture_output=True, text=True, check=True).stdout
    assert "Proxy Certificate Information: critical" in text  # a real RFC 3820 proxy...
    assert re.search(r"CN = Demo User, CN = \d+$", text.splitlines()[0])  # ...of the user's DN
    printed = datalakefs("demo", "rucio-cfg", "--x509-proxy", "--state-dir", str(lake.state_dir))
    assert printed.returncode == 0, printed.stderr
    assert f"client_x509_proxy = {proxy}" in printed.stdout
    config = tmp_path / "rucio.cfg"
    config.write_text(printed.stdout)
    os.chmod(config, 0o600)
    granted_before = front_log(lake).count('"GET /auth/x509_proxy HTTP/1.1" 200')
    mount = new_mount(f"rucio_config={config}")
    mount.start()
    assert set(lake.seed.scopes) <= set(os.listdir(mount.mountpoint))
    assert front_log(lake).count('"GET /auth/x509_proxy HTTP/1.1" 200') >= granted_before + 1
    assert (private_dir(mount) / "rucio" / "auth_token_for_account_root").is_file()


def test_a_certificate_the_lake_does_not_trust_stops_the_mount(
    lake: LakeStatus, new_mount: Callable[..., Mount], tmp_path: Path
) -> None:
    assert lake.x509 is not None
    cert, key = tmp_path / "usercert.pem", tmp_path / "userkey.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", lake.x509.dn,
                    "-keyout", str(key), "-out", str(cert)], capture_output=True, check=True)  # same DN, no CA
    os.chmod(key, 0o600)
    config = x509_cfg(lake, tmp_path / "rucio.cfg", auth_type="x509", client_cert=str(cert), client_key=str(key))
    mount = new_mount(f"rucio_config={config}")
    with pytest.raises(AssertionError, match="TLS handshake failed, a certificate was not accepted"):
        mount.start()
    assert not mount.is_mounted()
