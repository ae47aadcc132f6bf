"""Without pyfuse3 (a notebook image: ``pip install datalakefs`` without the ``fuse`` extra), the
package, its notebook API and the command line's other commands import and run; ``mount`` says what
is missing (issue 15)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# A stand-in for an environment without pyfuse3: a module set to None in sys.modules cannot be imported.
_NO_PYFUSE3 = "import sys; sys.modules['pyfuse3'] = None\n"


def run_without_pyfuse3(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _NO_PYFUSE3 + code], capture_output=True, text=True,
                          check=False, timeout=120)


def test_the_package_and_its_api_import_without_pyfuse3() -> None:
    done = run_without_pyfuse3(
        "import datalakefs\n"
        "print(datalakefs.stage.__module__, datalakefs.__version__)\n"
        "import datalakefs.cli, datalakefs.cli.status, datalakefs.cli.stage\n"
        "assert 'pyfuse3' not in [m for m, mod in sys.modules.items() if mod is not None]\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "datalakefs.api"


def test_status_runs_and_mount_says_what_is_missing(tmp_path: Path) -> None:
    done = run_without_pyfuse3("from datalakefs.cli import main; sys.exit(main(['status', '--json']))")
    assert done.returncode in (0, 1), done.stderr  # 1: some other mount on this machine does not answer
    (tmp_path / "mnt").mkdir()
    done = run_without_pyfuse3(
        f"from datalakefs.cli import main; sys.exit(main(['mount', '--foreground', '{tmp_path / 'mnt'}', "
        f"'-o', 'state_dir={tmp_path / 'state'}']))")
    assert done.returncode == 1
    assert "mounting needs pyfuse3" in done.stderr and "datalakefs[fuse]" in done.stderr
