"""Peak resident memory of this process above its level at entry, from a sampling thread.

Sampling costs CPU: measure memory in a pass of its own, never around a timed run on a small machine.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import psutil


class PeakRSS:
    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process(os.getpid())
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20
