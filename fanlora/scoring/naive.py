"""Eq. 3 the plain way — the reference every faster scorer is tested against.

``V(m, l) = S(M_all) − S(M_all without (m,l)) + S(M_null with only (m,l)) − S(M_null)``, with a whole forward
pass over the validation batches for each of the 2 + 2·N model settings, switched by PEFT's own adapter
toggles (:meth:`fanlora.gates.GatedLoRA.only` / ``without``). Too slow for real use (it is the "naive" row of
``benchmarks/scoring.py``), exact by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fanlora.gates import GatedLoRA
from fanlora.scoring.batches import performance
from fanlora.scoring.replay import Batch


@torch.no_grad()
def naive_ab(gated: GatedLoRA, batches: Sequence[Batch]) -> dict[str, float]:
    """The AB-score of every gate, ``"kind.layer"`` → V; all gates are on again afterwards."""
    gated.set_all(True)
    s_all = performance(gated, batches)
    gated.set_all(False)
    s_null = performance(gated, batches)
    out = {}
    for key in gated.keys:
        with gated.without([key]):
            without = performance(gated, batches)
        with gated.only([key]):
            only = performance(gated, batches)
        out[f"{key[0]}.{key[1]}"] = s_all - without + only - s_null
    gated.set_all(True)
    return out
