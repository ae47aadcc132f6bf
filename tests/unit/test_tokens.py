"""WLCG bearer token discovery, change detection, refusal of insecure files, and redaction."""

from __future__ import annotations

import io
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datalakefs.cli.logs import KeyValueFormatter, setup_logging
from datalakefs.errors import AccessDeniedError, ConfigError, TransferError
from datalakefs.redaction import redact_text, redact_url, register_secret
from datalakefs.transport.tokens import RECHECK_INTERVAL, BearerToken, StorageAuth, token_locations

UID = 4242


class Clock:
    """A monotonic clock the test moves: the token file is looked at again only once it moved on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def pass_recheck_interval(self) -> None:
        self.now += RECHECK_INTERVAL


def put(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    os.chmod(path, mode)


def test_discovery_order(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    assert token_locations({"BEARER_TOKEN": "x", "BEARER_TOKEN_FILE": "/f"}, UID) == ("env", ())
    assert token_locations({"BEARER_TOKEN_FILE": "/f", "XDG_RUNTIME_DIR": str(runtime)}, UID) == (
        "file", (Path("/f"),))
    assert token_locations({"XDG_RUNTIME_DIR": str(runtime)}, UID) == (
        "file", (runtime / f"bt_u{UID}", Path(f"/tmp/bt_u{UID}")))
    assert token_locations({}, UID) == ("file", (Path(f"/tmp/bt_u{UID}"),))


def test_env_token_wins(tmp_path: Path) -> None:
    put(tmp_path / "bt", "from-file-token")
    bearer = BearerToken({"BEARER_TOKEN": " env-token-value \n", "BEARER_TOKEN_FILE": str(tmp_path / "bt")}, UID)
    assert bearer.token() == "env-token-value"
    assert bearer.describe() == "$BEARER_TOKEN"


def test_runtime_dir_before_tmp_and_reread_only_on_change(tmp_path: Path) -> None:
    put(tmp_path / f"bt_u{UID}", "first-token-value\n")
    clock = Clock()
    bearer = BearerToken({"XDG_RUNTIME_DIR": str(tmp_path)}, UID, clock=clock)
    assert bearer.token() == "first-token-value"
    for _ in range(100):
        clock.pass_recheck_interval()
        assert bearer.token() == "first-token-value"
    assert bearer.reads == 1  # one stat per lookup, one read per change
    tmp = tmp_path / "new"
    put(tmp, "second-token-value")
    os.replace(tmp, tmp_path / f"bt_u{UID}")
    clock.pass_recheck_interval()
    assert bearer.token() == "second-token-value"
    assert bearer.reads == 2


def test_the_token_file_is_looked_at_once_per_interval_and_a_rotation_is_seen_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stat before every GET was a per-file cost of small files: within the interval no system call is
    made (a token rotated meanwhile waits for the interval's end, or for a 401/403's renew)."""
    path = tmp_path / "bt"
    put(path, "first-token-value")
    clock = Clock()
    bearer = BearerToken({"BEARER_TOKEN_FILE": str(path)}, UID, clock=clock)
    assert bearer.token() == "first-token-value"
    stats = []
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kw: stats.append(self) or real_stat(self, **kw))
    put(tmp_path / "new", "second-token-value")
    os.replace(tmp_path / "new", path)
    clock.now += RECHECK_INTERVAL / 2
    for _ in range(100):
        assert bearer.token() == "first-token-value"
    assert stats == []
    clock.now += RECHECK_INTERVAL / 2
    assert bearer.token() == "second-token-value"
    assert stats == [path]
    put(tmp_path / "new", "third-token-value")
    os.replace(tmp_path / "new", path)
    assert bearer.renew()  # a refused request re-reads at once, whatever the interval
    assert bearer.token() == "third-token-value"


def test_missing_and_empty_files_mean_no_token(tmp_path: Path) -> None:
    clock = Clock()
    bearer = BearerToken({"BEARER_TOKEN_FILE": str(tmp_path / "bt")}, UID, clock=clock)
    assert bearer.token() is None
    put(tmp_path / "bt", "  \n")
    clock.pass_recheck_interval()
    assert bearer.token() is None
    assert bearer.reads == 1
    assert StorageAuth({"BEARER_TOKEN_FILE": str(tmp_path / "bt")}, UID).headers("http://x/") == {}


def test_renew_reports_a_change_only(tmp_path: Path) -> None:
    path = tmp_path / "bt"
    put(path, "token-number-one")
    bearer = BearerToken({"BEARER_TOKEN_FILE": str(path)}, UID)
    assert bearer.token() == "token-number-one"
    assert not bearer.renew()
    stat = path.stat()
    path.write_text("token-number-two")  # same size, mtime forced back: only a forced re-read sees it
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert bearer.renew()
    assert bearer.token() == "token-number-two"


def test_a_file_readable_by_others_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "bt"
    put(path, "group-readable-token", 0o640)
    clock = Clock()
    bearer = BearerToken({"BEARER_TOKEN_FILE": str(path)}, UID, clock=clock)
    with pytest.raises(ConfigError, match=r"readable or writable by its group or others.*chmod 600"):
        bearer.check()
    with caplog.at_level(logging.ERROR):
        assert bearer.token() is None
        clock.pass_recheck_interval()
        assert bearer.token() is None
    assert len(caplog.records) == 1  # one message per file state, not one per request
    os.chmod(path, 0o600)
    bearer.check()
    clock.pass_recheck_interval()
    assert bearer.token() == "group-readable-token"


def test_auth_headers_and_proxy_only_without_token(tmp_path: Path) -> None:
    path = tmp_path / "bt"
    put(path, "header-token-value")
    auth = StorageAuth({"BEARER_TOKEN_FILE": str(path), "X509_USER_PROXY": str(tmp_path / "absent")}, UID)
    assert auth.headers("https://h/f") == {"Authorization": "Bearer header-token-value"}
    assert auth.ssl_context("https://h/f") is not None  # the CA policy's context, without a certificate
    assert auth.ssl_context("http://h/f") is None
    assert auth.describe()["x509_proxy"] is None


@pytest.mark.parametrize("url", ["http://localhost:8080/f", "http://127.0.0.1/f", "http://127.8.9.10/f",
                                 "http://[::1]:1094/f", "https://storage.example/f"])
def test_a_token_goes_over_https_or_to_loopback(tmp_path: Path, url: str) -> None:
    put(tmp_path / "bt", "travelling-token")
    assert StorageAuth({"BEARER_TOKEN_FILE": str(tmp_path / "bt")}, UID).headers(url) == {
        "Authorization": "Bearer travelling-token"
    }


@pytest.mark.parametrize("url", ["http://storage.example/f", "http://localhost.example:80/f", "http://10.0.0.1/f",
                                 "http://vm:1094/f"])
def test_a_token_never_goes_over_plain_http_elsewhere_unless_allowed(tmp_path: Path, url: str) -> None:
    env = {"BEARER_TOKEN_FILE": str(tmp_path / "bt")}
    assert StorageAuth(env, UID).headers(url) == {}  # no token, nothing to protect
    put(tmp_path / "bt", "stay-home-token")
    with pytest.raises(AccessDeniedError, match="allow_token_over_http") as refused:
        StorageAuth(env, UID).headers(url)
    assert "stay-home-token" not in str(refused.value)
    allowed = StorageAuth(env, UID, allow_token_over_http=True)
    assert allowed.headers(url) == {"Authorization": "Bearer stay-home-token"}


def test_a_token_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bt"
    put(path, "someone-elses-token")
    os.chown(path, UID + 1, -1)
    clock = Clock()
    bearer = BearerToken({"BEARER_TOKEN_FILE": str(path)}, UID, clock=clock)
    assert bearer.token() is None
    with pytest.raises(ConfigError, match=f"belongs to uid {UID + 1}"):
        bearer.check()
    os.chown(path, UID, -1)
    clock.pass_recheck_interval()
    assert bearer.token() == "someone-elses-token"
    os.chown(path, 0, -1)  # root's file is the mounting user's to use
    clock.pass_recheck_interval()
    assert bearer.token() == "someone-elses-token"


def test_redaction_of_urls_texts_and_registered_secrets() -> None:
    register_secret("opaque-secret-0123456789")
    text = redact_text(
        "GET https://user:pw@h:1/f?authz=Bearer%20abc.def&x=1 failed; Authorization: Bearer tok-en_1 "
        "opaque-secret-0123456789 eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    )
    for secret in ("pw", "abc.def", "tok-en_1", "opaque-secret", "eyJ", "c2lnbmF0dXJl"):
        assert secret not in text
    assert "x=1" in text and "h:1/f" in text
    prose = "bearer token file /run/user/1/bt_u1 is readable by its group; no password given"
    assert redact_text(prose) == prose
    assert redact_text("HTTP header:  X-Rucio-Password: pw123") == "HTTP header:  X-Rucio-Password: [hidden]"
    assert redact_text('{"password": "pw123", "user": "u"}') == '{"password": "[hidden]", "user": "u"}'
    assert redact_url("https://u:p@h:1/a/b?authz=x#f") == "https://h:1/a/b"
    assert "opaque-secret" not in str(TransferError("reading with opaque-secret-0123456789 failed"))


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    yield root
    root.handlers[:] = before[0]
    root.setLevel(before[1])


def test_log_lines_are_key_value_one_line_and_redacted(root_logger: logging.Logger) -> None:
    register_secret("log-canary-secret-42")
    stream = io.StringIO()
    setup_logging("debug", stream)
    logger = logging.getLogger("datalakefs.test")
    logger.debug("multi\nline with log-canary-secret-42")
    try:
        raise ValueError("boom authz=log-canary")
    except ValueError:
        logger.exception("event=failed what=%s", "x")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].split()[1:4] == ["level=DEBUG", "logger=datalakefs.test", 'msg="multi\\nline']
    assert "event=failed what=x exc=" in lines[1]
    assert "log-canary" not in stream.getvalue()
    assert isinstance(logging.getLogger().handlers[0].formatter, KeyValueFormatter)


def test_x509_proxy_is_the_client_certificate_only_without_a_token(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=proxy",
                    "-keyout", str(key), "-out", str(cert)], capture_output=True, check=True)
    proxy = tmp_path / "x509up"
    put(proxy, cert.read_text() + key.read_text())
    env = {"X509_USER_PROXY": str(proxy), "BEARER_TOKEN_FILE": str(tmp_path / "bt")}
    clock = Clock()
    auth = StorageAuth(env, UID, clock=clock)
    assert auth.describe()["x509_proxy"] == str(proxy)
    with_proxy = auth.ssl_context("https://storage.example/f")
    assert with_proxy is not None and auth.ssl_context("https://storage.example/f") is with_proxy
    assert auth.ssl_context("http://storage.example/f") is None
    put(tmp_path / "bt", "now-there-is-a-token")
    clock.pass_recheck_interval()
    trust_only = auth.ssl_context("https://storage.example/f")
    assert trust_only is not None and trust_only is not with_proxy
    (tmp_path / "bt").unlink()
    clock.pass_recheck_interval()
    os.utime(proxy, ns=(1, 1))  # a renewed proxy: its context is built again, without a remount
    renewed = auth.ssl_context("https://storage.example/f")
    assert renewed is not None and renewed is not with_proxy and renewed is not trust_only
    put(proxy, "not a certificate")
    assert auth.describe()["x509_proxy"] is None  # unusable: warned, reads go on
    assert auth.ssl_context("https://storage.example/f") is trust_only


_TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/="


@settings(max_examples=200)
@given(
    secret=st.text(alphabet=_TOKEN_CHARS, min_size=12, max_size=80),
    inner=st.integers(min_value=0, max_value=4),
    before=st.text(max_size=40),
    after=st.text(max_size=40),
)
def test_a_registered_secret_never_survives_redaction(secret: str, inner: int, before: str, after: str) -> None:
    shorter = secret[inner : inner + 8]  # a registered secret that is part of another one
    register_secret(shorter)
    register_secret(secret)
    text = redact_text(f"{before}{secret}{after} Authorization: Bearer {secret} ?authz={secret}")
    assert secret not in text


@given(st.text(alphabet=_TOKEN_CHARS + "&=%", min_size=1, max_size=60))
def test_redacted_urls_keep_no_query(query: str) -> None:
    assert redact_url(f"https://user:pw@host:8443/path/file?{query}#frag") == "https://host:8443/path/file"
