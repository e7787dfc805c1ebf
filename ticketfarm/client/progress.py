"""A one-line live progress bar on stderr (redrawn in place on a terminal, sparse lines otherwise)."""
from __future__ import annotations

import sys
import time

from master.stats import SweepStats


class ProgressBar:
    def __init__(self, stream=sys.stderr, width: int = 30, every: float = 0.2):
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        # Without a terminal (CI logs, pipes) a new line every few seconds is enough.
        self.every = every if self.tty else 5.0
        self._last = 0.0

    def show(self, s: SweepStats, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        filled = int(self.width * s.settled / s.total) if s.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        eta = "?" if s.eta is None else f"{s.eta:.0f}s"
        line = (f"{s.name} [{bar}] {s.settled}/{s.total} done={s.done} failed={s.failed} "
                f"running={s.running} {s.throughput:.1f}/s eta {eta}")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
