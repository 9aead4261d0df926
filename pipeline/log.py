"""Progress output: plain lines on stderr, flushed, so a user never stares at a silent terminal."""

from __future__ import annotations

import sys
import time


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """Rate-limited progress lines: ``label 12/100 (3.1 s) extra``."""

    def __init__(self, label: str, total: int, every_s: float = 2.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if done == self.total or now - self.last >= self.every_s:
            self.last = now
            info(f"  {self.label} {done}/{self.total} ({now - self.start:.1f} s){' ' + extra if extra else ''}")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
