"""Log lines: one line per event, ``key=value`` fields, levels, and never a credential.

Every line is ``ts=<UTC ISO time> level=<LEVEL> logger=<name>`` followed by the event: a message that
is already structured (it starts with ``event=``) is kept as it is, any other becomes ``msg="..."``
(JSON string escapes, so a line never breaks). An exception adds ``exc="..."`` with its traceback on
the same line. The whole line goes through :func:`datalakefs.redaction.redact_text` last, so neither a
bearer token, nor an ``authz=`` value, nor a URL's user info reaches a log, whichever library wrote it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

from datalakefs.errors import ConfigError
from datalakefs.redaction import redact_text

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class KeyValueFormatter(logging.Formatter):
    """See the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
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
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)
