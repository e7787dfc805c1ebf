"""The end of the batch job a slave runs in, and its idle limit: which tickets fit, when to hand back, when to go."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Walltime:
    """`end` (epoch s, 0 = none) less `handback` is when the slave must have handed back all it holds."""

    end: float = 0.0
    handback: float = 0.0
    idle_exit: float = 0.0
    """Seconds with nothing held after which the slave leaves (0 = never)."""
    closing: bool = False
    """Set once a ticket did not fit: the slave asks for no more and leaves when what it holds is done."""
    idle_since: float = 0.0

    @property
    def limit(self) -> float:
        return self.end - self.handback if self.end else float("inf")

    def fits(self, timeout: float, now: float | None = None) -> bool:
        """A ticket with this timeout, started now, is over before the hand-back point."""
        return (time.time() if now is None else now) + timeout <= self.limit

    def over(self, now: float) -> bool:
        """The hand-back point has come: whatever still runs goes back to the master."""
        return now >= self.limit

    def idle_too_long(self, idle: bool, now: float) -> bool:
        if not idle:
            self.idle_since = 0.0
            return False
        if not self.idle_since:
            self.idle_since = now
        return bool(self.idle_exit) and now - self.idle_since >= self.idle_exit
