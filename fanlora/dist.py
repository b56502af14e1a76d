"""Which process this is in a multi-process job (torchrun, ``accelerate launch``), and how many threads it runs.

Launchers set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment before any process group exists, so
those are read first (rank 0 can write a run's files before training starts); once torch.distributed is
initialised, its own rank and size are the truth.

**Threads per process**: how many threads torch's intra-op (OpenMP) team gets — the CPUs this process may
use, not the host's.

torch sizes its team by the host's cores. A container with a CPU quota (Kubernetes' ``limits.cpu``, Docker's
``--cpus``) or a process pinned to fewer CPUs (``taskset``) then runs more busy-waiting OpenMP threads than it
has CPUs, and every parallel region waits for descheduled threads: beside one CPU-bound neighbour on 2 cores a
served token took 2–4.5× longer with the default team than with one thread (docs/serving.md, "Threads").
Neither torch nor transformers reads the quota, so this module does: the team is the smallest of the affinity
mask (``os.sched_getaffinity``) and the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``), rounded down, at least 1.

Who decides, first match wins: ``--threads N`` (`fanlora serve`), the ``FANLORA_THREADS`` environment variable
(every command), ``OMP_NUM_THREADS`` (as torch itself honours it), then serve's default (below) or, for every
other command, the CPUs found here.

`fanlora serve` defaults to **one** thread, chosen by measurement (``benchmarks/neighbour.py``, 2 cores,
``benchmarks/results/neighbour.txt``): one thread decodes a stream as fast as two on an idle machine (0.99×) and
keeps beside a busy neighbour what two threads lose (a token beside a pure-Python loop 1.04× its idle time,
beside a one-thread training loop 1.18×, beside a two-thread torch loop 1.43×; with two threads 2.6×, 2.5×,
3.4×), for ~13 % of clean-machine batched throughput (0.87× [0.75, 1.01] with 8 clients). Two threads that wait
passively (``OMP_WAIT_POLICY=PASSIVE``) were measured too and lost on both counts to one thread (0.83× its
batched throughput). ``--threads 2`` gives the clean-room throughput back on a machine with nothing beside it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from fanlora.errors import UserError


def _initialised() -> bool:
    import sys

    if "torch" not in sys.modules:  # no process group can exist before torch is imported
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if _initialised():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if _initialised():
        import torch.distributed as dist

        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def group() -> tuple[int, int]:
    """(rank, size) of the initialised process group this process belongs to, or (0, 1) outside one."""
    if not _initialised():
        return 0, 1
    return rank(), world_size()


def device() -> Any:
    import torch  # here, not at the top: the CLI imports this module before it needs torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def say(message: str) -> None:
    """Print on rank 0 only (every rank runs the same code)."""
    if is_main():
        print(message, flush=True)


# --- threads ------------------------------------------------------------------------------------------------
#: `fanlora serve`'s team when neither --threads nor an environment variable says otherwise (None: all CPUs); with
#: --threads auto (the default) it is where the adaptive team starts (fanlora/serving/team.py).
SERVE_THREADS: int | None = 1


def _cgroup_dir(root: Path, controller: str | None) -> Path:
    """This process's own cgroup folder under ``root`` (v2 when ``controller`` is None), else ``root``."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return root
    for line in lines:
        _, names, path = line.split(":", 2)
        if (controller is None and names == "") or (controller and controller in names.split(",")):
            here = root / path.lstrip("/")
            return here if here.is_dir() else root
    return root


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (e.g. 1.5), or None when there is no quota."""
    v2 = _cgroup_dir(root, None) / "cpu.max"
    try:
        if v2.is_file():
            quota, *rest = v2.read_text().split()  # "max 100000", or "150000 100000" for 1.5 CPUs
            return None if quota == "max" else int(quota) / int(rest[0] if rest else 100000)
        v1 = _cgroup_dir(root / "cpu", "cpu")
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        period_us = int((v1 / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on: affinity mask and cgroup quota, whichever is smaller (≥ 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_quota(root)
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def _from_env(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{name}={text!r} is not a number of threads ≥ 1: unset it or give e.g. {name}=1")
    return int(text)


def threads_from_env() -> int | None:
    """FANLORA_THREADS, else OMP_NUM_THREADS, when set."""
    for name in ("FANLORA_THREADS", "OMP_NUM_THREADS"):
        value = _from_env(name)
        if value is not None:
            return value
    return None


def choose_threads(flag: int | None = None, serve: bool = False) -> int:
    """The team size: ``flag``, FANLORA_THREADS, OMP_NUM_THREADS, serve's default, or the CPUs available."""
    if flag is not None:
        if flag < 1:
            raise UserError(f"--threads {flag} must be ≥ 1 (the CPUs this process may use: {available_cpus()})")
        return flag
    value = threads_from_env()
    if value is not None:
        return value
    if serve and SERVE_THREADS is not None:
        return SERVE_THREADS
    return available_cpus()


def configure_threads(flag: int | None = None, serve: bool = False) -> int:
    """Set torch's intra-op team (threads that start torch work later inherit it) and return its size."""
    import torch

    n = choose_threads(flag, serve)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
