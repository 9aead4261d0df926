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


def rss() -> str:
    """``, RSS 3.2 GB``: this process's resident memory now (Linux), for lines about long steps."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return f", RSS {kb / 1e6:.1f} GB"
    except (OSError, StopIteration, ValueError):
        return ""


class heartbeat:
    """``with heartbeat("export"):`` prints ``  export: still running (30 s)`` every ``every_s`` seconds
    while a silent library call (optimum export, ORT optimizer, quantizers) works on a large model."""

    def __init__(self, label: str, every_s: float = 15.0):
        import threading

        self.label, self.every_s = label, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.wait(self.every_s):
            info(f"  {self.label}: still running ({time.perf_counter() - start:.0f} s{rss()})")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
