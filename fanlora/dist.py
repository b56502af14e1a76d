"""Which process this is in a multi-process job (torchrun, ``accelerate launch``): one place for rank and world.

Launchers set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment before any process group exists, so
those are read first (rank 0 can write a run's files before training starts); once torch.distributed is
initialised, its own rank and size are the truth.
"""

from __future__ import annotations

import os
from typing import Any


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
