"""What a mount writes about its user stays that user's: journal, logs, rucio's token cache, the mount
records and spool files are 0600, their directories 0700.

Two measures, taken before the mount writes anything: the process umask is 077, so every file and
directory it creates is private whatever code creates it (sqlite's journal and its -wal/-shm
files, rucio's token file, log files); and what earlier versions left more open under the state
directory's own subdirectories is tightened. A symbolic link is never followed, and nothing that
belongs to another user is touched.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

PRIVATE_UMASK: Final = 0o077
#: the state directory's subdirectories that the mount writes (logs, mount records and rucio's
#: token caches, the outbox journal and spool)
STATE_SUBDIRS: Final = ("logs", "mounts", "outbox")


def keep_private(state_dir: Path) -> None:
    """Set the umask and tighten what is already under ``state_dir``'s subdirectories."""
    os.umask(PRIVATE_UMASK)
    for name in STATE_SUBDIRS:
        for directory, _dirs, files in os.walk(state_dir / name):  # never descends into a link
            _tighten(directory)
            for file in files:
                _tighten(os.path.join(directory, file))


def _tighten(path: str) -> None:
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or not stat.S_IMODE(st.st_mode) & 0o077:
        return
    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
