"""Log lines: one line per event, ``key=value`` fields, levels, and never a credential.

Every line is ``ts=<UTC ISO time> level=<LEVEL> logger=<name>`` followed by the event: a message that
is already structured (it starts with ``event=``) is kept as it is, any other becomes ``msg="..."``
(JSON string escapes, so a line never breaks). An exception adds ``exc="..."`` with its traceback on
the same line. The whole line goes through :func:`datalakefs.redaction.redact_text` last, so neither a
bearer token, nor an ``authz=`` value, nor a URL's user info reaches a log, whichever library wrote it.

Under systemd (stderr is the journal's stream, ``$JOURNAL_STREAM``), each line starts with its syslog
priority, ``<3>`` for ERROR to ``<7>`` for DEBUG (sd-daemon(3)): journald files it at that priority, so
``journalctl -p warning`` shows warnings and errors only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

from datalakefs.errors import ConfigError
from datalakefs.redaction import redact_text

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: syslog priorities of the levels (sd-daemon(3) prefixes)
_PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def to_journal(fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal (``$JOURNAL_STREAM`` = dev:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return bool(expected) and expected == f"{st.st_dev}:{st.st_ino}"


def log_destination() -> str:
    """Where this process's log lines go, for ``datalakefs status``: ``journald``, or what stderr is (a
    log file, a terminal)."""
    if to_journal():
        return "journald"
    try:
        return os.readlink("/proc/self/fd/2")
    except OSError:
        return "stderr"


class KeyValueFormatter(logging.Formatter):
    """See the module docstring. ``journal``: start each line with its syslog priority."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = self._line(record)
        return f"<{_PRIORITIES.get(record.levelname, 6)}>{line}" if self._journal else line

    def _line(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        head = f"ts={stamp} level={record.levelname} logger={record.name}"
        body = message if message.startswith("event=") and "\n" not in message else "msg=" + json.dumps(message)
        line = f"{head} {body}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        elif record.exc_text:
            line += " exc=" + json.dumps(record.exc_text)
        return redact_text(line)


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr: the terminal with --foreground, the journal under systemd, else the
    mount's log file) at ``level`` (a name in :data:`LEVELS`, case-insensitive)."""
    name = level.upper()
    if name not in LEVELS:
        raise ConfigError(f"option log_level: {level!r} is not one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter(journal=stream is None and to_journal()))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)
