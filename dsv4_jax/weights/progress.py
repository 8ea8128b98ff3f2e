"""A one-line progress report on stderr of the bytes a long job (a checkpoint's load, or its writing by
scripts/make_checkpoint.py) has done of its total: the rate, the share, the time left.

Rewritten in place (carriage return) at most every ``interval`` seconds, then ended with the totals; a load
under ``min_bytes`` (tiny test checkpoints), or not ``enabled``, reports nothing.
"""

from __future__ import annotations

import sys
import time

GB = 1e9


class ByteProgress:
    def __init__(self, total_bytes: int, what: str, enabled: bool = True, stream=None, interval: float = 0.5,
                 min_bytes: int = 2**28, clock=time.monotonic):
        self.total, self.what, self.interval, self.clock = total_bytes, what, interval, clock
        self.stream = sys.stderr if stream is None else stream
        self.active = enabled and total_bytes >= min_bytes
        self.done, self.start, self.note = 0, clock(), ""
        self.shown = self.start - interval  # the first update shows

    def update(self, nbytes: int, note: str = "") -> None:
        """``nbytes`` more done; ``note`` (what is being done now) ends the line."""
        self.done += nbytes
        self.note = note
        now = self.clock()
        if self.active and now - self.shown >= self.interval:
            self.shown = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()

    def close(self) -> None:
        if self.active:
            self.stream.write("\r" + self._line(self.clock(), final=True) + "\n")
            self.stream.flush()

    def _line(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        head = f"{self.what}: {self.done / GB:.1f} / {self.total / GB:.1f} GB, {rate / GB:.2f} GB/s"
        if final:
            return f"{head}, {elapsed:.1f} s"
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        return f"{head} ({100 * self.done / max(self.total, 1):.0f}%, {left:.0f} s left){self.note and ', '}{self.note}"
