"""Stage b: how much each (kind, layer) LoRA module matters, by several scorers behind one protocol
(:mod:`fanlora.scoring.scorers`).

The re-exports below load on first use: the CLI reads the scorer registry to build ``--method``'s choices,
and that must not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SCORES_FORMAT": "fanlora.scoring.table",
    "ScoreTable": "fanlora.scoring.table",
    "make_batches": "fanlora.scoring.batches",
    "performance": "fanlora.scoring.batches",
    "response_nll": "fanlora.scoring.batches",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
