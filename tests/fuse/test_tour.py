"""The tour `make demo` prints works as printed (issue 15): each command, pasted into a fresh shell
that has none of the lake's environment (no DATALAKEFS_CONFIG, no RUCIO_CONFIG), succeeds against a
real mount, and the commands that act on a path use the configuration of the mount it is under."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from datalakefs.demo.status import LakeStatus
from tests.fuse.mounting import Mount

pytestmark = [pytest.mark.lake, pytest.mark.fuse]


def fresh_shell(command: str) -> subprocess.CompletedProcess[str]:
    """``command`` in a new bash with only what a login gives: HOME and a PATH with datalakefs on it."""
    env = {"HOME": os.environ.get("HOME", "/root"), "TERM": "dumb",
           "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300, env=env,
                          check=False)


def test_the_printed_tour_works_in_a_fresh_shell(lake: LakeStatus, new_mount: Callable[..., Mount],
                                                 demo_cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    mount = new_mount()
    mount.start()
    printed = demo_cli("tour", str(mount.mountpoint))
    assert printed.returncode == 0, printed.stderr
    dataset = f"my_results_{uuid.uuid4().hex[:8]}"  # the tour's dataset, unique to this run
    commands = [re.sub(r"\s+# .*$", "", line).replace("my_results", dataset)
                for line in printed.stdout.splitlines() if line.strip()]
    assert any(c.startswith("datalakefs stage ") for c in commands)
    outputs = {}
    for command in commands:
        done = fresh_shell(command)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs[command.split()[0] + " " + command.split()[1]] = done.stdout
    stage_output = next(out for cmd, out in outputs.items() if cmd.startswith("datalakefs stage"))
    rule_id = re.search(r"rule (\w+) OK", stage_output).group(1)  # type: ignore[union-attr]
    state = next(out for cmd, out in outputs.items() if cmd.startswith("getfattr -n"))
    assert f'user.datalakefs.state="rule {rule_id} OK' in state
    assert str(mount.mountpoint) in outputs["datalakefs status"] and "  log " in outputs["datalakefs status"]
