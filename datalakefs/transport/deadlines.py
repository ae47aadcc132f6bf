"""The one deadline policy of storage requests: a total deadline that grows with the bytes moved.

A request may take ``base`` seconds (connecting, the server's first answer, a pause) plus the time its
bytes need at ``min_rate`` bytes a second; after that it is abandoned as a timeout, however steadily
bytes still trickle in. A stalled server (no byte for ``stall`` seconds) is caught earlier, by the
transports' socket timeouts. So no server, however slow, holds a transfer slot for long: the slot goes
to the next transfer (or the next replica).
"""

from __future__ import annotations

from dataclasses import dataclass

from datalakefs.errors import ConfigError, TransferError


@dataclass(frozen=True, slots=True)
class Deadline:
    """``seconds(n)``: how long a request that moves ``n`` bytes may take in total."""

    base: float
    min_rate: float

    def __post_init__(self) -> None:
        if self.min_rate <= 0:
            raise ConfigError("transfer_min_rate must be above 0 bytes a second")

    def seconds(self, size: int) -> float:
        return self.base + max(size, 0) / self.min_rate

    def explain(self, size: int) -> str:
        """Why a request was abandoned, for its error message."""
        return (
            f"not done within {self.seconds(size):.0f} s ({size} bytes at the minimum rate of "
            f"{self.min_rate:.0f} bytes/s, plus {self.base:g} s)"
        )


class DeadlineExceededError(TransferError):
    """A storage request outlived its :class:`Deadline`."""
