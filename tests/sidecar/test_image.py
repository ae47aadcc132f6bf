"""The sidecar image, run as a pod runs it (issue 15): built by `make sidecar`, started through its
entrypoint against the test lake, its mount shared back to the host as the notebook container sees it
(a Bidirectional volume is an rshared bind mount), a file read there, and a clean unmount on SIGTERM.

Slow (it needs the image): run by `make sidecar-test`, outside `make test`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from datalakefs.demo.seed import content
from datalakefs.demo.status import LakeStatus
from datalakefs.fuse.session import mounted_fstype
from datalakefs.model import DID

IMAGE = os.environ.get("IMAGE", "localhost/datalakefs-sidecar:latest")
# How podman can run containers on these machines: crun refuses cgroups in hybrid mode, and the
# container's rlimits may only be lowered (no CAP_SYS_RESOURCE to set podman's defaults).
RUN_OPTIONS = os.environ.get("SIDECAR_RUN_OPTIONS",
                             "--runtime runc --ulimit nofile=4096:4096 --ulimit nproc=4096:4096").split()
pytestmark = [
    pytest.mark.lake,
    pytest.mark.fuse,
    pytest.mark.skipif(not os.environ.get("DATALAKEFS_SIDECAR"), reason="slow: run by `make sidecar-test`"),
]


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def shared_volume(tmp_path: Path) -> Iterator[Path]:
    """A directory shared both ways, like a pod's emptyDir under Bidirectional propagation."""
    volume = tmp_path / "lake"
    volume.mkdir()
    subprocess.run(["mount", "--bind", str(volume), str(volume)], check=True)
    subprocess.run(["mount", "--make-rshared", str(volume)], check=True)
    yield volume
    if mounted_fstype(str(volume)) == "fuse.datalakefs":
        subprocess.run(["fusermount3", "-uz", str(volume)], check=False)
    subprocess.run(["umount", "-l", str(volume)], check=False)


def sidecar_config(lake: LakeStatus, directory: Path) -> Path:
    """The ConfigMap: datalakefs.toml and a rucio.cfg whose token cache is the daemon's own."""
    directory.mkdir()
    rucio = re.sub(r"(?m)^auth_token_file_path\s*=.*$", "", lake.rucio_config.read_text())
    (directory / "rucio.cfg").write_text(rucio)
    toml = re.sub(r"(?m)^(cache_dir|state_dir)\s*=.*$", "", lake.datalakefs_config.read_text())
    toml = re.sub(r"(?m)^rucio_config\s*=.*$", 'rucio_config = "/etc/datalakefs/rucio.cfg"', toml)
    (directory / "config.toml").write_text(toml)
    return directory


def test_the_sidecar_serves_the_notebook_side_and_unmounts_on_sigterm(
    lake: LakeStatus, shared_volume: Path, tmp_path: Path
) -> None:
    assert lake.seed is not None
    if shutil.which("podman") is None or podman("image", "exists", IMAGE).returncode != 0:
        pytest.fail(f"{IMAGE} is not built: `make sidecar`", pytrace=False)
    name = f"datalakefs-sidecar-test-{uuid.uuid4().hex[:8]}"
    config = sidecar_config(lake, tmp_path / "config")
    state = tmp_path / "state-volume"
    state.mkdir()
    run = podman(
        "run", *RUN_OPTIONS, "--detach", "--name", name, "--privileged", "--network", "host", "--device", "/dev/fuse",
        "--volume", f"{shared_volume}:/lake:rshared",
        "--volume", f"{config}:/etc/datalakefs:ro",
        "--volume", f"{state}:/var/lib/datalakefs",
        "--volume", f"{lake.state_dir}:{lake.state_dir}:ro",  # the lake's CA and X509 proxy
        "--env", "DATALAKEFS_CONFIG=/etc/datalakefs/config.toml",
        "--env", f"X509_USER_PROXY={lake.env['X509_USER_PROXY']}",
        IMAGE, "-o", "allow_other,uid=1000,gid=100")
    assert run.returncode == 0, run.stderr
    try:
        deadline = time.monotonic() + 120
        while mounted_fstype(str(shared_volume)) != "fuse.datalakefs":
            state_now = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state_now == "running", podman("logs", name).stderr
            assert time.monotonic() < deadline, "the sidecar did not mount within 120 s"
            time.sleep(0.5)
        # the notebook side: the host's view of the shared volume
        assert set(lake.seed.scopes) <= set(os.listdir(shared_volume))
        did = DID.parse(lake.seed.sized_files[1048577])
        path = shared_volume / did.scope / lake.seed.sized_dataset.split(":")[1] / did.name
        assert path.read_bytes() == content(lake.seed.content_key, str(did), 1048577)
        assert path.stat().st_uid == 1000
        assert any(state.iterdir()), "the daemon's state is not on the state volume"

        stop = podman("stop", "--time", "60", name, timeout=90)  # SIGTERM, as pod deletion sends
        assert stop.returncode == 0, stop.stderr
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = podman("logs", name).stderr
        assert exit_code == "0", logs
        assert "event=unmounted" in logs and "event=stop-timeout" not in logs
        assert mounted_fstype(str(shared_volume)) != "fuse.datalakefs"
    finally:
        podman("rm", "--force", name)
