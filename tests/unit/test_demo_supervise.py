"""The demo lake's supervisor (demo/assets/supervise.py) starts a crashed server again, and only then."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from datalakefs.demo.layout import ASSETS

SUPERVISE = str(ASSETS / "supervise.py")


def supervise(tmp_path: Path, server: str) -> subprocess.Popen[str]:
    """The supervisor running ``server`` (Python source) as its server, in ``tmp_path``."""
    return subprocess.Popen([sys.executable, SUPERVISE, "--name", "toy", "--", sys.executable, "-c", server],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# A server that crashes (SIGKILL) the first time, then exits with status 3.
CRASH_ONCE_THEN_EXIT_3 = """
import os, signal, sys
if not os.path.exists("crashed"):
    open("crashed", "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
open("second", "w").close()
sys.exit(3)
"""


def test_a_crashed_server_is_started_again_and_an_exit_status_ends_the_supervisor(tmp_path: Path) -> None:
    proc = supervise(tmp_path, CRASH_ONCE_THEN_EXIT_3)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out  # the server's own status: a failed start is not retried
    assert (tmp_path / "second").exists()  # the crash was followed by a second start
    assert "toy: died of SIGKILL" in out
    assert "exited with status 3; not started again" in out


def test_a_server_that_exits_is_not_started_again(tmp_path: Path) -> None:
    proc = supervise(tmp_path, "import sys; open('ran', 'a').write('x'); sys.exit(0)")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (tmp_path / "ran").read_text() == "x"


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sigterm_is_passed_to_the_server_and_ends_the_supervisor(tmp_path: Path) -> None:
    server = """
import os, signal, time
def bye(*_):
    open("got-term", "w").close()
    raise SystemExit(0)
signal.signal(signal.SIGTERM, bye)
open("pid", "w").write(str(os.getpid()))
while True:
    time.sleep(1)
"""
    proc = supervise(tmp_path, server)
    _wait_for(tmp_path / "pid")
    server_pid = int((tmp_path / "pid").read_text())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (tmp_path / "got-term").exists()
    assert not Path(f"/proc/{server_pid}").exists()  # waited for (reaped) before the supervisor ended


def test_a_server_crashing_in_a_loop_is_given_up(tmp_path: Path) -> None:
    """More than MAX_CRASHES crashes within WINDOW: exit 1. The pauses are shortened through a copy
    of the script with smaller constants, so the test does not wait 31 s."""
    script = (ASSETS / "supervise.py").read_text()
    quick = script.replace("PAUSE_FIRST = 1.0", "PAUSE_FIRST = 0.01").replace("PAUSE_MAX = 30.0", "PAUSE_MAX = 0.02")
    assert quick != script
    copy = tmp_path / "supervise_quick.py"
    copy.write_text(quick)
    proc = subprocess.run(
        [sys.executable, str(copy), "--name", "toy", "--", sys.executable, "-c",
         "import os, signal; open('starts', 'a').write('x'); os.kill(os.getpid(), signal.SIGKILL)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stdout
    assert (tmp_path / "starts").read_text() == "x" * 6  # MAX_CRASHES = 5 restarts, then it gives up
    assert "6 crashes in 600 s: giving up" in proc.stdout
