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

from fanlora.errors import UserError
from fanlora.gates import GatedLoRA
from fanlora.scoring.journal import Journal
from fanlora.scoring.replay import Batch, Replayer
from fanlora.scoring.rowgates import RowGates


def passes(method: str) -> list[float]:
    """Gate values at which gradients are taken."""
    return [1.0] if method == "sensitivity" else [1.0, 0.0]


def entry_id(batch: int, at: float) -> str:
    return f"b{batch}:g{at:g}"


def run(
    method: str,
    gated: GatedLoRA,
    batches: Sequence[Batch],
    progress: Journal,
    mine: Sequence[int],
    n_tokens: int,
    tick: Callable[[int], None] = lambda n: None,
) -> None:
    """Gate gradients of batches ``mine`` at each gate value the method needs, recorded per batch."""
    lm = gated.model.get_base_model()
    replayer = Replayer(lm, gated.layout.layers_path)
    gates = RowGates(gated)
    device = batches[0].input_ids.device
    keys = gated.keys
    with gates.active():
        for at in passes(method):
            for i in mine:
                if entry_id(i, at) in progress.done:
                    continue
                params = {k: torch.tensor(at, device=device, requires_grad=True) for k in keys}
                gates.gates.update(params)
                nll, _ = replayer.forward(batches[i])
                # sensitivity: the batch's own mean loss; first order: this batch's share of −S
                loss = nll.sum() / (batches[i].n_scored if method == "sensitivity" else n_tokens)
                grads = torch.autograd.grad(loss, list(params.values()))
                progress.record(
                    {
                        "id": entry_id(i, at),
                        "grad": {f"{k}.{n}": float(g) for (k, n), g in zip(keys, grads, strict=True)},
                    }
                )
                tick(1)


def assemble(
    method: str, entries: dict[str, dict[str, Any]], keys: list[str], n_batches: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    missing = [entry_id(i, at) for at in passes(method) for i in range(n_batches) if entry_id(i, at) not in entries]
    if missing:
        raise UserError(
            f"the scores are incomplete: no gradients for batch {', '.join(missing[:4])} — give every shard "
            "(or re-run `fanlora score` to finish)"
        )

    def grads(at: float) -> list[dict[str, float]]:
        return [entries[entry_id(i, at)]["grad"] for i in range(n_batches)]

    if method == "sensitivity":
        g1 = grads(1.0)
        values = {k: sum(abs(g[k]) for g in g1) / n_batches for k in keys}
        return values, {}
    # the loss was −S's share, so ∂S/∂g = −Σ grad
    d_all = {k: -sum(g[k] for g in grads(1.0)) for k in keys}
    d_null = {k: -sum(g[k] for g in grads(0.0)) for k in keys}
    values = {k: d_all[k] + d_null[k] for k in keys}
    return values, {k: {"dS_dg_at_all": d_all[k], "dS_dg_at_null": d_null[k]} for k in keys}
