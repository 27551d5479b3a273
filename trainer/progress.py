"""One progress line (count, share, rate, elapsed, ETA) on stderr for the long loops of the
data check and prepare: redrawn in place on a terminal, one line every 10 s in a log file.
A loop that ends before its first report prints nothing, so small trees stay quiet."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

TTY_FIRST, TTY_EVERY = 1.0, 0.2  # seconds: on a terminal, first draw and redraws
LOG_EVERY = 10.0  # seconds between lines when stderr is a file or pipe


def clock(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def line(label: str, done: int, total: int, what: str, elapsed: float) -> str:
    rate = done / max(elapsed, 1e-9)
    left = (total - done) / rate if rate > 0 else 0.0
    return (f"{label}: {done}/{total} {what} ({100 * done / max(total, 1):.0f}%) {rate:.1f}/s "
            f"elapsed {clock(elapsed)} ETA {clock(left)}")


class Progress:
    """Counts finished items; shows ``line`` when it is due, and a last one at the end if any
    was shown."""

    def __init__(self, total: int, label: str, what: str = "images", stream: TextIO | None = None,
                 now: Callable[[], float] = time.monotonic):
        self.total, self.label, self.what, self.done = total, label, what, 0
        self.stream = stream or sys.stderr
        self.now = now
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = now()
        self.next = self.start + (TTY_FIRST if self.tty else LOG_EVERY)
        self.shown = False

    def update(self, n: int = 1) -> None:
        self.done += n
        t = self.now()
        if self.done >= self.total:
            if self.shown:
                self._show(t, final=True)
        elif t >= self.next:
            self.next = t + (TTY_EVERY if self.tty else LOG_EVERY)
            self._show(t, final=False)

    def _show(self, t: float, final: bool) -> None:
        text = line(self.label, self.done, self.total, self.what, t - self.start)
        if self.tty:
            end = "\n" if final else ""
            print(f"\r{text}\033[K", end=end, file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)
        self.shown = True
