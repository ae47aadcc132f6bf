"""Operations through real mounts (issue 8, SPEC §7): status, metrics, logs, multi-user options."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections.abc import Callable

import pytest

from datalakefs.demo.status import LakeStatus
from tests.fuse.mounting import Mount, datalakefs
from tests.fuse.test_browse import path_of

pytestmark = [pytest.mark.lake, pytest.mark.fuse]


def mount_options(mountpoint: str) -> set[str]:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == mountpoint:
                super_options = line.split(" - ", 1)[1].split()[2]
                return set(fields[5].split(",")) | set(super_options.split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def test_status_table_json_and_metrics(lake: LakeStatus, new_mount: Callable[..., Mount]) -> None:
    mount = new_mount("metrics_port=0")
    mount.start()
    data = path_of(mount, lake.seed.sized_files[1048577]).read_bytes()
    assert len(data) == 1048577
    state = mount.options[1]  # state_dir=...
    listed = datalakefs("status", "--json", "--config", str(mount.config), "-o", state)
    assert listed.returncode == 0, listed.stderr
    records = {r["mountpoint"]: r for r in json.loads(listed.stdout)["mounts"]}
    mine = records[str(mount.mountpoint)]
    assert mine["pid"] == mount.pid
    content = mine["status"]["content"]
    assert content["cache"]["used_bytes"] >= 1048577 and content["bytes_fetched"] >= 1048577
    # only this mount: other sessions' mounts (a killed daemon's, say) must not decide the exit code
    table = datalakefs("status", "--config", str(mount.config), "-o", state, str(mount.mountpoint))
    assert table.returncode == 0, table.stderr
    block = table.stdout.split(str(mount.mountpoint), 1)[1].split("\n\n")[0]
    assert f"pid {mount.pid}  up" in block
    assert "hit rate" in block and "in flight" in block and "/s, " in block and "requests/s" in block
    url = mine["status"]["metrics"]["url"]
    assert url.startswith("http://127.0.0.1:")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as reply:
        metrics = reply.read().decode()
    line = next(x for x in metrics.splitlines() if x.startswith("datalakefs_content_bytes_fetched_total{"))
    assert float(line.rsplit(" ", 1)[1]) >= 1048577


def test_single_user_by_default_and_allow_other_only_with_default_permissions(
    lake: LakeStatus, new_mount: Callable[..., Mount]
) -> None:
    private = new_mount()
    private.start()
    options = mount_options(str(private.mountpoint))
    assert "allow_other" not in options and "default_permissions" in options
    shared = new_mount("allow_other=true")
    shared.start()
    options = mount_options(str(shared.mountpoint))
    assert {"allow_other", "default_permissions"} <= options


def test_an_unknown_log_level_is_refused_with_the_option_named(
    lake: LakeStatus, new_mount: Callable[..., Mount]
) -> None:
    mount = new_mount("log_level=chatty")
    with pytest.raises(AssertionError, match="option log_level: 'chatty' is not one of DEBUG"):
        mount.start()
    assert not mount.is_mounted()
    assert not os.path.ismount(mount.mountpoint)


def test_a_busy_metrics_port_stops_the_mount_with_the_option_named(
    lake: LakeStatus, new_mount: Callable[..., Mount]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        mount = new_mount(f"metrics_port={port}")
        with pytest.raises(AssertionError, match=f"option metrics_port: cannot listen on 127.0.0.1:{port}"):
            mount.start()
    assert not mount.is_mounted()
