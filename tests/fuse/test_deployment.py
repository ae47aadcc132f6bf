"""Workstation and notebook-pod deployment (issue 8, SPEC §1 and §7): the systemd units and the
sidecar entrypoint, run the way systemd and Kubernetes run them, against the real lake."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datalakefs.demo.seed import rse_file
from datalakefs.demo.status import LakeStatus
from datalakefs.fuse.session import mounted_fstype, wait_gone
from datalakefs.model import DID
from tests.fuse.mounting import Mount

pytestmark = [pytest.mark.lake, pytest.mark.fuse]

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_UNIT = ROOT / "systemd" / "datalakefs@.service"
USER_UNIT = ROOT / "systemd" / "user" / "datalakefs.service"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DATALAKEFS = [sys.executable, "-m", "datalakefs"]


def directives(unit: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith(f"{key}=")]


def escape_path(path: str) -> str:
    """``systemd-escape --path``: the instance name of a mount point."""
    tool = shutil.which("systemd-escape")
    assert tool is not None, "systemd-escape is missing: `make sysdeps` installs it"
    return subprocess.run([tool, "--path", path], capture_output=True, text=True, check=True).stdout.strip()


def unescape_path(instance: str) -> str:
    """What systemd's ``%f`` gives for ``instance``."""
    return "/" + re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), instance.replace("-", "/"))


def expand(command: str, specifiers: dict[str, str], environment: dict[str, str]) -> list[str]:
    """A unit's command line as systemd runs it: ``%x`` specifiers, ``$VAR`` split into words, and the
    bare ``datalakefs`` (found on systemd's fixed search path) replaced by this checkout's."""
    words: list[str] = []
    for word in shlex.split(command):
        for spec, value in specifiers.items():
            word = word.replace(spec, value)
        if word.startswith("$") and word[1:] in environment:
            words += environment[word[1:]].split()
        else:
            words.append(word)
    return DATALAKEFS + words[1:] if words[0] == "datalakefs" else words


@pytest.mark.parametrize(("unit", "name", "user"), [(SYSTEM_UNIT, "datalakefs@lake.service", False),
                                                    (USER_UNIT, "datalakefs.service", True)])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, unit: Path, name: str, user: bool) -> None:
    # verify insists that ExecStart's program exists on systemd's fixed search path; ours is in a venv
    datalakefs = Path(sys.executable).with_name("datalakefs")
    copy = tmp_path / name
    copy.write_text(unit.read_text().replace("ExecStart=datalakefs ", f"ExecStart={datalakefs} "))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: `make sysdeps` installs it"
    argv = ["systemd-analyze", *(["--user"] if user else []), "verify", str(copy)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr
    assert directives(unit, "Type") == ["notify"]


def test_instance_name_is_the_escaped_mount_point() -> None:
    for path in ("/lake", "/data/lake one", "/mnt/a-b"):
        assert unescape_path(escape_path(path)) == path
    assert escape_path("/data/lake one") == "data-lake\\x20one"


@contextlib.contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while wanted not in messages:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            messages += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            break
    return messages


def cleanup(mountpoint: Path, process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
    if mounted_fstype(str(mountpoint)) is not None:
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, capture_output=True)


def test_system_unit_reports_ready_and_stops_cleanly(lake: LakeStatus, tmp_path: Path) -> None:
    mountpoint = tmp_path / "lake one"
    instance = escape_path(str(mountpoint))
    environment = {"DATALAKEFS_OPTIONS": f"--config {lake.datalakefs_config} -o "
                                          f"cache_dir={tmp_path / 'cache'},state_dir={tmp_path / 'state'}"}
    specifiers = {"%f": unescape_path(instance), "%i": instance}
    # the spaces in the mount point: one argument, as %f is in systemd
    start = expand(directives(SYSTEM_UNIT, "ExecStart")[0].replace("%f", "MOUNTPOINT"), specifiers, environment)
    start = [str(mountpoint) if word == "MOUNTPOINT" else word for word in start]
    for pre in directives(SYSTEM_UNIT, "ExecStartPre"):
        subprocess.run([w if w != "%f" else str(mountpoint) for w in shlex.split(pre)], check=True)
    process = None
    journal = tmp_path / "journal"
    with notify_socket(tmp_path / "notify") as sock, open(journal, "wb") as stderr:
        try:
            process = subprocess.Popen(start, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                                       stdout=subprocess.DEVNULL, stderr=stderr)
            assert "READY=1" in receive(sock, "READY=1", 120), "no READY=1 from the daemon"
            assert set(lake.seed.scopes) <= set(os.listdir(mountpoint))  # ready means usable
            process.send_signal(signal.SIGTERM)  # systemctl stop: KillSignal=SIGTERM
            assert process.wait(timeout=int(directives(SYSTEM_UNIT, "TimeoutStopSec")[0])) == 0
            assert "STOPPING=1" in receive(sock, "STOPPING=1", 5)
            assert mounted_fstype(str(mountpoint)) is None
            assert "level=INFO logger=datalakefs.fuse.session event=unmounted" in journal.read_text()
        finally:
            cleanup(mountpoint, process)


def test_sidecar_entrypoint_cleans_a_stale_mount_and_unmounts_on_sigterm(lake: LakeStatus, tmp_path: Path) -> None:
    mountpoint = tmp_path / "lake"
    # storage through the token origin only, the token from a file "another container" writes
    options = ["--config", str(lake.datalakefs_config),
               "-o", f"cache_dir={tmp_path / 'cache'},state_dir={tmp_path / 'state'}",
               "-o", f"read_schemes=root,xcache={lake.urls['token_http']}"]
    token = tmp_path / "shared-volume" / "bt"
    token.parent.mkdir()
    token.touch(mode=0o600)
    token.write_text(subprocess.run(lake.token_command, capture_output=True, text=True, check=True).stdout)
    crashed = Mount(mountpoint, lake.datalakefs_config, f"cache_dir={tmp_path / 'c0'}",
                    f"state_dir={tmp_path / 's0'}")
    crashed.start()
    crashed_pid = crashed.pid
    os.kill(crashed_pid, signal.SIGKILL)  # a crashed daemon leaves a stale mount behind
    assert wait_gone(crashed_pid, timeout=30)
    assert mounted_fstype(str(mountpoint)) is not None
    env = {**os.environ, "DATALAKEFS_MOUNTPOINT": str(mountpoint), "DATALAKEFS": shlex.join(DATALAKEFS),
           "DATALAKEFS_STOP_TIMEOUT": "30", "BEARER_TOKEN_FILE": str(token)}
    log_path = tmp_path / "sidecar.log"
    with open(log_path, "wb") as stderr:
        process = subprocess.Popen(["sh", str(ENTRYPOINT), *options], env=env, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if set(lake.seed.scopes) <= set(os.listdir(mountpoint)):
                    break
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.2)
        else:
            pytest.fail("the sidecar did not mount within 120 s")
        did = DID.parse(lake.seed.sized_files[1048577])
        read = (mountpoint / did.scope / did.name).read_bytes()
        assert read == rse_file(lake.paths["origin"], did.scope, did.name).read_bytes()
        daemon = json.loads((mountpoint / ".datalakefs" / "status.json").read_text())["pid"]
        process.send_signal(signal.SIGTERM)  # pod deletion
        assert process.wait(timeout=60) == 0
        log = log_path.read_text()
        assert "event=stale-mount" in log and "event=stop" in log and "event=exit" in log
        assert "event=stop-timeout" not in log  # the daemon unmounted by itself
        assert mounted_fstype(str(mountpoint)) is None
        with pytest.raises(ProcessLookupError):
            os.kill(daemon, 0)
    finally:
        cleanup(mountpoint, process)
        crashed.stop()


def test_system_unit_uses_its_state_and_cache_directories_and_journal_priorities(lake: LakeStatus,
                                                                                tmp_path: Path) -> None:
    """What systemd gives the unit's process: $STATE_DIRECTORY and $CACHE_DIRECTORY (from the unit's
    StateDirectory=/CacheDirectory=, per instance) and a journal stream on stderr ($JOURNAL_STREAM)."""
    assert directives(SYSTEM_UNIT, "StateDirectory") == ["datalakefs/%i"]
    assert directives(SYSTEM_UNIT, "CacheDirectory") == ["datalakefs/%i"]
    assert directives(USER_UNIT, "CacheDirectory") == ["datalakefs"]
    mountpoint = tmp_path / "lake"
    instance = escape_path(str(mountpoint))
    state, cache = tmp_path / "var-lib" / instance, tmp_path / "var-cache" / instance
    state.mkdir(parents=True)
    cache.mkdir(parents=True)
    environment = {"DATALAKEFS_OPTIONS": f"--config {no_dirs_config(lake, tmp_path)}"}
    start = expand(directives(SYSTEM_UNIT, "ExecStart")[0], {"%f": str(mountpoint), "%i": instance}, environment)
    mountpoint.mkdir()
    journal = tmp_path / "journal"
    process = None
    with notify_socket(tmp_path / "notify") as sock, open(journal, "wb") as stderr:
        stream = os.fstat(stderr.fileno())
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "STATE_DIRECTORY": str(state),
               "CACHE_DIRECTORY": str(cache), "JOURNAL_STREAM": f"{stream.st_dev}:{stream.st_ino}"}
        try:
            process = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
            assert "READY=1" in receive(sock, "READY=1", 120), journal.read_text()
            did = DID.parse(lake.seed.sized_files[1])
            assert (mountpoint / did.scope / did.name).read_bytes()
            assert list((state / "mounts").glob("*.json")), "the registry is not in $STATE_DIRECTORY"
            assert any(cache.iterdir()), "the block cache is not in $CACHE_DIRECTORY"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            cleanup(mountpoint, process)
    lines = journal.read_text().splitlines()
    assert lines and all(re.match(r"<[2-7]>ts=", line) for line in lines if "ts=" in line), lines[:5]
    assert any(line.startswith("<6>ts=") and "event=mounted" in line for line in lines)


def no_dirs_config(lake: LakeStatus, tmp_path: Path) -> Path:
    """The lake's datalakefs.toml without its cache_dir and state_dir, as a system-wide config is."""
    text = re.sub(r"(?m)^(cache_dir|state_dir)\s*=.*$", "", lake.datalakefs_config.read_text())
    config = tmp_path / "config.toml"
    config.write_text(text)
    return config


def test_the_lake_mounts_over_a_volume_and_leaves_it_when_it_ends(lake: LakeStatus, tmp_path: Path) -> None:
    """In a pod, the sidecar's /lake is itself a mount (the shared volume, a bind mount): the lake is
    mounted on top of it, and the entrypoint's stale-mount check leaves the volume alone."""
    volume = tmp_path / "volume"
    volume.mkdir()
    subprocess.run(["mount", "--bind", str(volume), str(volume)], check=True)
    try:
        assert mounted_fstype(str(volume)) not in (None, "fuse.datalakefs")
        check = subprocess.run(["sh", "-c", f". /dev/stdin; is_mounted {shlex.quote(str(volume))}"],
                               input=is_mounted_function(), text=True, check=False)
        assert check.returncode == 1, "the entrypoint would take the volume for a stale lake"
        with Mount(volume, lake.datalakefs_config, f"cache_dir={tmp_path / 'c'}", f"state_dir={tmp_path / 's'}"):
            assert mounted_fstype(str(volume)) == "fuse.datalakefs"
            assert set(lake.seed.scopes) <= set(os.listdir(volume))
            check = subprocess.run(["sh", "-c", f". /dev/stdin; is_mounted {shlex.quote(str(volume))}"],
                                   input=is_mounted_function(), text=True, check=False)
            assert check.returncode == 0
        assert mounted_fstype(str(volume)) not in (None, "fuse.datalakefs")  # the volume is still there
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)


def is_mounted_function() -> str:
    """The entrypoint's ``is_mounted`` shell function, on its own."""
    text = ENTRYPOINT.read_text()
    return text[text.index("is_mounted() {"):text.index("\n}\n", text.index("is_mounted() {")) + 3]
