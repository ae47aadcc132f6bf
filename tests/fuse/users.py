"""An unprivileged account for the tests that use datalakefs the way a scientist does, from their own
login: the suite creates it when it runs as root, and is that user otherwise.

The user's commands run with its uid, gid and no supplementary groups (``subprocess``'s ``user=``,
``group=``, ``extra_groups=``), with an environment of its own: nothing of root's leaks in but what a
test hands over explicitly.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

NAME = "datalakefs-test"
FUSE_DEVICE = Path("/dev/fuse")


@dataclass(frozen=True)
class TestUser:
    name: str
    uid: int
    gid: int
    #: a fresh directory of this session, owned by the user: its HOME and the place for its files
    home: Path

    __test__ = False  # not a test class for pytest

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", **(extra or {})}

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 180,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """``argv`` as this user; ``env`` adds to the user's own environment."""
        as_other = os.getuid() != self.uid
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check,
                              cwd=self.home, env=self.environment(env),
                              user=self.uid if as_other else None, group=self.gid if as_other else None,
                              extra_groups=[] if as_other else None)

    def output(self, *argv: str) -> str:
        """The standard output of ``argv`` run as this user, which must succeed."""
        done = self.run(list(argv))
        assert done.returncode == 0, f"{argv} as {self.name} failed: {done.stderr}"
        return done.stdout

    def give(self, path: Path, mode: int = 0o600) -> Path:
        """Make ``path`` (created by the test as root) this user's own, with ``mode``."""
        os.chown(path, self.uid, self.gid)
        path.chmod(mode)
        return path


def fuse_problem() -> str | None:
    """Why an unprivileged user cannot mount here, or None."""
    mode = FUSE_DEVICE.stat().st_mode
    if not mode & stat.S_IROTH or not mode & stat.S_IWOTH:
        return (f"{FUSE_DEVICE} is mode {stat.S_IMODE(mode):04o}: users cannot mount FUSE filesystems; "
                "scripts/install-system-packages.sh sets 0666, as Debian's udev rule does")
    fusermount = shutil.which("fusermount3")
    if fusermount is None or not os.stat(fusermount).st_mode & stat.S_ISUID:
        return "fusermount3 is missing or not setuid root: users cannot mount FUSE filesystems"
    return None


def unprivileged_user() -> TestUser:
    """The test account (created when missing, kept for later sessions) with a fresh home directory;
    the current user when the suite does not run as root."""
    if os.getuid() != 0:
        entry = pwd.getpwuid(os.getuid())
    else:
        try:
            entry = pwd.getpwnam(NAME)
        except KeyError:
            done = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                                   "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", NAME],
                                  capture_output=True, text=True, check=False)
            try:  # another session may have created it at the same moment
                entry = pwd.getpwnam(NAME)
            except KeyError:
                raise RuntimeError(f"cannot create the test user {NAME}: {done.stderr.strip()}") from None
    home = Path(tempfile.mkdtemp(prefix=f"{entry.pw_name}-", dir="/var/tmp"))
    os.chown(home, entry.pw_uid, entry.pw_gid)
    return TestUser(entry.pw_name, entry.pw_uid, entry.pw_gid, home)
