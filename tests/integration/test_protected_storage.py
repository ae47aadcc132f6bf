"""The demo lake's token-protected storage at the HTTP level: what a mount relies on."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest

from datalakefs.demo.seed import rse_file
from datalakefs.demo.status import LakeStatus
from datalakefs.model import DID

pytestmark = pytest.mark.lake

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Range": "bytes=0-99"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with _DIRECT.open(urllib.request.Request(url, headers=headers), timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


@pytest.mark.parametrize("endpoint", ["token_http", "guard_http"])
def test_only_a_valid_token_reads(lake: LakeStatus, endpoint: str) -> None:
    did = DID.parse(lake.seed.sized_files[1048577])
    path = rse_file(lake.paths["origin"], did.scope, did.name)
    url = lake.urls[endpoint] + "/" + str(path.relative_to(lake.paths["rse"]))

    def mint(*extra: str) -> str:
        return subprocess.run([*lake.token_command, *extra], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert get(url, None)[0] in (401, 403)
    assert get(url, "not-a-jwt")[0] in (401, 403)
    assert get(url, mint("--expired"))[0] in (401, 403)
    assert get(url, mint("--wrong-key"))[0] in (401, 403)
    status, body = get(url, mint())
    assert status == 206 and body == path.read_bytes()[:100]


def test_demo_token_command_mints_tokens(lake: LakeStatus, demo_cli: Any) -> None:
    did = DID.parse(lake.seed.sized_files[1048577])  # ranges past the end trip XrdHttp 5.5.3: not a tiny file
    path = rse_file(lake.paths["origin"], did.scope, did.name)
    url = lake.urls["token_http"] + "/" + str(path.relative_to(lake.paths["rse"]))
    valid = demo_cli("token", state_dir=lake.state_dir, port_base=None)
    expired = demo_cli("token", "--expired", state_dir=lake.state_dir, port_base=None)
    assert valid.returncode == 0 and expired.returncode == 0, valid.stderr + expired.stderr
    assert get(url, valid.stdout.strip()) == (206, path.read_bytes()[:100])
    assert get(url, expired.stdout.strip())[0] == 403
