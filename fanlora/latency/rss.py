"""Peak memory above its level at entry: resident memory from a sampling thread on CPU, the CUDA allocator's
own counters on a GPU (exact and free; the paper's Table 3 reports ``max_memory_allocated``).

Sampling costs CPU: measure memory in a pass of its own, never around a timed run on a small machine.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import psutil
import torch


class PeakRSS:
    name = "RSS"

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


class PeakCUDA:
    """Peak bytes the CUDA caching allocator handed out on ``device`` above the level at entry."""

    name = "CUDA max_memory_allocated"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def peak_memory(device: torch.device) -> PeakRSS | PeakCUDA:
    """The right meter for where the model runs (its ``name`` says what it measures)."""
    return PeakCUDA(device) if device.type == "cuda" else PeakRSS()
