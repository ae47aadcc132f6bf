"""Progress bars for long commands, drawn only on a terminal.

    with Progress("downloading", total=size) as bar:
        for chunk in ...:
            bar.advance(len(chunk))

With a ``total`` the line shows a bar, the percentage, done/total, the rate and the time left; without
one (a wait of unknown length) it shows what was done, the rate and the time spent. The line is
redrawn at most every ``interval`` seconds, with ``\\r``, on ``stream`` (stderr by default), and only
when that stream is a terminal and ``$TERM`` is not ``dumb``: in pipes, logs and CI nothing is drawn.
Leaving the ``with`` block ends the line. ``unit="B"`` prints sizes in KiB/MiB/GiB, any other unit
plain counts. :func:`human_bytes` and :func:`human_duration` are the formats every command shares.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TextIO

BAR_WIDTH = 24


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"



def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


class Progress:
    def __init__(
        self,
        label: str,
        total: float | None = None,
        *,
        unit: str = "B",
        stream: TextIO | None = None,
        interval: float = 0.1,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0.0
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = is_terminal(self._stream)
        self._interval = interval
        self._started = time.monotonic()
        self._drawn_at = float("-inf")
        self._width = 0

    def __enter__(self) -> Progress:
        self.draw()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def advance(self, amount: float) -> None:
        self.update(self.done + amount)

    def update(self, done: float) -> None:
        self.done = done
        if time.monotonic() - self._drawn_at >= self._interval:
            self.draw()

    def _amount(self, value: float) -> str:
        return human_bytes(value) if self.unit == "B" else f"{value:,.0f} {self.unit}".rstrip()

    def line(self) -> str:
        """The text of the progress line as it would be drawn now."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            fraction = min(max(self.done / self.total, 0.0), 1.0)
            filled = int(fraction * BAR_WIDTH)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            left = (self.total - self.done) / rate if rate > 0 else None
            eta = f" {human_duration(left)} left" if left is not None and fraction < 1 else ""
            return (
                f"{self.label} [{bar}] {100 * fraction:3.0f}% {self._amount(self.done)}/{self._amount(self.total)}"
                f" {self._amount(rate)}/s{eta}"
            )
        done = f" {self._amount(self.done)} {self._amount(rate)}/s" if self.done else ""
        return f"{self.label}{done} ({human_duration(elapsed)})"

    def draw(self) -> None:
        if not self._enabled:
            return
        text = self.line()
        padding = " " * max(0, self._width - len(text))
        self._stream.write("\r" + text + padding)
        self._stream.flush()
        self._width = len(text)
        self._drawn_at = time.monotonic()

    def close(self) -> None:
        if self._enabled:
            self.draw()
            self._stream.write("\n")
            self._stream.flush()
            self._enabled = False
