"""The tour `make demo` prints works as printed (issue 15): each command, pasted into a fresh shell
that has none of the lake's environment (no DATALAKEFS_CONFIG, no RUCIO_CONFIG, and no venv on the
PATH, as after `make demo`), succeeds against a real mount, and the commands that act on a path use the
configuration of the mount it is under."""

from __future__ import annotations

import os
import re
import shlex
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
    """``command`` in a new bash in the repository (where `make demo` runs) with only what a login gives:
    HOME and the system's PATH, without the venv (`make demo` calls `.venv/bin/datalakefs` by its path)."""
    env = {"HOME": os.environ.get("HOME", "/root"), "TERM": "dumb", "PATH": "/usr/local/bin:/usr/bin:/bin"}
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300, env=env,
                          check=False, cwd=REPOSITORY)


REPOSITORY = Path(__file__).resolve().parents[2]


def test_the_printed_tour_works_in_a_fresh_shell(lake: LakeStatus, new_mount: Callable[..., Mount]) -> None:
    mount = new_mount()
    mount.start()
    # as `make demo` prints it: by the venv's python, from a shell whose PATH lacks the venv
    printed = fresh_shell(shlex.join([sys.executable, "-m", "datalakefs.demo.command", "tour", str(mount.mountpoint),
                                      "--state-dir", str(lake.state_dir), "--port-base", str(lake.port_base)]))
    assert printed.returncode == 0, printed.stderr
    dataset = f"my_results_{uuid.uuid4().hex[:8]}"  # the tour's dataset, unique to this run
    commands = [re.sub(r"\s+# .*$", "", line).replace("my_results", dataset)
                for line in printed.stdout.splitlines() if line.strip()]
    program = next(c.split()[0] for c in commands if " stage " in c)
    assert program.endswith("/datalakefs")  # by its path: the fresh shell's PATH does not find it
    outputs = {}
    for command in commands:
        done = fresh_shell(command)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        words = command.replace(program, "datalakefs", 1).split()
        outputs[words[0] + " " + words[1]] = done.stdout
    stage_output = next(out for cmd, out in outputs.items() if cmd.startswith("datalakefs stage"))
    rule_id = re.search(r"rule (\w+) OK", stage_output).group(1)  # type: ignore[union-attr]
    state = next(out for cmd, out in outputs.items() if cmd.startswith("getfattr -n"))
    assert f'user.datalakefs.state="rule {rule_id} OK' in state
    assert str(mount.mountpoint) in outputs["datalakefs status"] and "  log " in outputs["datalakefs status"]
