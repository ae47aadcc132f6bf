"""Rates of the daemon's counters over a sliding window, for the status file and the metrics.

:class:`RateMeter` samples a set of monotonically growing counters once per ``interval`` seconds and
reports, per counter, the increase per second over the last ``window`` seconds (0 until it has two
samples). Sampling is one call of ``counters`` on the trio thread: cheap by contract.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

import trio

Counters = Callable[[], Mapping[str, float]]


class RateMeter:
    def __init__(self, counters: Counters, *, window: float = 10.0, interval: float = 1.0) -> None:
        self._counters = counters
        self._interval = interval
        self._samples: deque[tuple[float, Mapping[str, float]]] = deque(maxlen=max(2, int(window / interval) + 1))

    def sample(self, now: float) -> None:
        self._samples.append((now, dict(self._counters())))

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            self.sample(trio.current_time())
            await trio.sleep(self._interval)

    def rates(self) -> dict[str, float]:
        """Increase per second of each counter over the window."""
        if len(self._samples) < 2:
            return {key: 0.0 for key in self._counters()}
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        span = t1 - t0
        return {key: round(max(0.0, (last[key] - first.get(key, 0.0)) / span), 1) if span > 0 else 0.0 for key in last}
