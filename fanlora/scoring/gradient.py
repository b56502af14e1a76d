"""Scores from gate gradients: one or two forward-backward passes instead of 2·N·L forward passes.

* ``sensitivity`` (Michel et al., 2019, "Are sixteen heads really better than one?"): the mean over
  validation batches of |∂L/∂g| at g = 1, L being the batch's mean response-token loss. Always ≥ 0: it says
  how much a module matters, not in which direction.
* ``ab-first-order``: the first-order Taylor estimate of each half of eq. 3 — S(M_all) − S(M_all without m)
  ≈ ∂S/∂g_m at all gates 1, and S(M_null + m) − S(M_null) ≈ ∂S/∂g_m at all gates 0 — summed, signed.

Only the gates need gradients (the model's weights are frozen), so the backward pass is cheap. Each batch's
gradients are one unit of work: recorded as they finish, split over processes, added up at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fanlora.backbone import module_key
from fanlora.errors import UserError
from fanlora.gates import GatedLoRA
from fanlora.scoring.journal import Journal
from fanlora.scoring.replay import Batch, Replayer
from fanlora.scoring.rowgates import RowGates

SENSITIVITY_PASSES = (1.0,)  # gate values at which gradients are taken
FIRST_ORDER_PASSES = (1.0, 0.0)


def entry_id(batch: int, at: float) -> str:
    return f"b{batch}:g{at:g}"


def run(
    passes: Sequence[float],
    per_batch_mean: bool,
    gated: GatedLoRA,
    batches: Sequence[Batch],
    progress: Journal,
    mine: Sequence[int],
    n_tokens: int,
    tick: Callable[[int], None] = lambda n: None,
) -> None:
    """Gate gradients of batches ``mine`` at each gate value in ``passes``, recorded per batch, of the batch's
    own mean loss (``per_batch_mean``: sensitivity) or of its share of −S (first order)."""
    lm = gated.model.get_base_model()
    replayer = Replayer(lm, gated.layout.layers_path)
    gates = RowGates(gated)
    device = batches[0].input_ids.device
    keys = gated.keys
    with gates.active():
        for at in passes:
            for i in mine:
                if entry_id(i, at) in progress.done:
                    continue
                params = {k: torch.tensor(at, device=device, requires_grad=True) for k in keys}
                gates.gates.update(params)
                nll, _ = replayer.forward(batches[i])
                loss = nll.sum() / (batches[i].n_scored if per_batch_mean else n_tokens)
                grads = torch.autograd.grad(loss, list(params.values()))
                progress.record(
                    {
                        "id": entry_id(i, at),
                        "grad": {module_key(k, n): float(g) for (k, n), g in zip(keys, grads, strict=True)},
                    }
                )
                tick(1)


def _gradients(
    entries: dict[str, dict[str, Any]], passes: Sequence[float], n_batches: int
) -> dict[float, list[dict[str, float]]]:
    """Every batch's recorded gradients at each gate value; an incomplete set is refused."""
    missing = [entry_id(i, at) for at in passes for i in range(n_batches) if entry_id(i, at) not in entries]
    if missing:
        raise UserError(
            f"the scores are incomplete: no gradients for batch {', '.join(missing[:4])} — give every shard "
            "(or re-run `fanlora score` to finish)"
        )
    return {at: [entries[entry_id(i, at)]["grad"] for i in range(n_batches)] for at in passes}


def assemble_sensitivity(
    entries: dict[str, dict[str, Any]], keys: list[str], n_batches: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean |∂L/∂g| at all gates 1 over the batches."""
    g1 = _gradients(entries, SENSITIVITY_PASSES, n_batches)[1.0]
    return {k: sum(abs(g[k]) for g in g1) / n_batches for k in keys}, {}


def assemble_first_order(
    entries: dict[str, dict[str, Any]], keys: list[str], n_batches: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """∂S/∂g at all gates 1 plus at all gates 0; the loss was −S's share, so ∂S/∂g = −Σ grad."""
    grads = _gradients(entries, FIRST_ORDER_PASSES, n_batches)
    d_all = {k: -sum(g[k] for g in grads[1.0]) for k in keys}
    d_null = {k: -sum(g[k] for g in grads[0.0]) for k in keys}
    values = {k: d_all[k] + d_null[k] for k in keys}
    return values, {k: {"dS_dg_at_all": d_all[k], "dS_dg_at_null": d_null[k]} for k in keys}
