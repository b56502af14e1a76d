"""``fanlora serve --threads auto``: torch's team on the engine thread, sized every second by how busy the rest of
the machine is.

Why: measured on this 2-core machine (``benchmarks/neighbour.py``, docs/serving.md), one thread decodes a stream
as fast as two when the machine is idle and 2–3× faster than two beside a CPU-bound neighbour (an OpenMP team
larger than the CPUs it gets waits for its slowest thread at every parallel region), while two threads serve a
busy, clean machine's batched load ~13 % faster. No fixed size wins both; OpenMP's passive waiting did not
help (measured too). So the team follows the CPUs left over: each second it reads the busy time of this
process's CPUs from ``/proc/stat``, subtracts its own CPU time, and takes as many threads as there are CPUs
the others leave (at least one, at most the CPUs it may use). A neighbour that starts costs at most a second at
the larger team; when it leaves, the team grows back. torch's ``set_num_threads`` is called on the engine thread
itself (the only thread that runs torch in the server), between two steps.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

PERIOD = 1.0  # seconds between two looks at the machine
SLACK = 0.3  # a CPU the others use less than 70 % of counts as free
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds(cpus: set[int], stat: Path = Path("/proc/stat")) -> float | None:
    """CPU-seconds spent busy so far on ``cpus`` (every state but idle and iowait), or None off Linux."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields]
        total += sum(values[:8]) - values[3] - values[4]  # user nice system idle iowait irq softirq steal
    return total / TICKS


class AdaptiveTeam:
    """Resizes torch's team on the calling (engine) thread from :meth:`tick`, called between two steps."""

    def __init__(
        self,
        most: int,
        busy: Callable[[], float | None] | None = None,
        own: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        resize: Callable[[int], None] | None = None,
        cpus: int | None = None,
    ) -> None:
        try:
            mine = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            mine = set(range(os.cpu_count() or 1))
        self.cpus = cpus if cpus is not None else len(mine)
        self.most = max(1, most)
        self.busy = busy or (lambda: busy_seconds(mine))
        self.own, self.clock = own, clock
        self.resize = resize or _set_threads
        self.size = 1
        self.resizes = 0
        self.last = (self.clock(), self.busy(), self.own())

    def tick(self) -> int:
        """Look again if a period has passed; returns the team size."""
        now = self.clock()
        then, busy_then, own_then = self.last
        if now - then < PERIOD:
            return self.size
        busy, own = self.busy(), self.own()
        self.last = (now, busy, own)
        if busy is None or busy_then is None:
            return self.size
        others = max(0.0, (busy - busy_then) - (own - own_then)) / (now - then)
        want = min(self.most, max(1, math.floor(self.cpus - others + SLACK)))
        if want != self.size:
            self.resize(want)
            self.size = want
            self.resizes += 1
        return self.size


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
