"""``grad-norm``: the normalised gradient norm of "Understanding and Guiding Layer Placement in PEFT"
(Xu et al., arXiv 2602.04019, 2026; the Layer Card's "resnorm"), per (kind, layer) of the *bare* backbone: how
much of the loss's residual a linear adapter on that module could take up. One forward-backward pass per
validation batch; no stage a (engine: :mod:`fanlora.scoring.probes`).

The paper scores whole layers and states that, for squared loss and linear adapters, the projected residual
norm equals a normalised gradient norm, the normalisation coming from the layer's activation energy. Used here,
per module (an extension to (kind, layer), as the issue asks): ``||∂L/∂W||_F / sqrt(Σ_t ||x_t||² / in)`` —
L the mean response-token loss of the whole validation set, x_t the module's input at every non-padding token.
That is the projected residual norm when the inputs' covariance is isotropic; the paper's exact whitening by
the full covariance is not reproduced (an in x in inverse per module). The summed gradient makes the whole
set one unit of work (computed by rank 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fanlora.scoring.scorers.registry import Assembled, Scorer, Study, register

if TYPE_CHECKING:  # annotations only (torch)
    from fanlora.gates import GatedLoRA
    from fanlora.scoring.journal import Journal


class GradNorm(Scorer):
    name = "grad-norm"
    summary = "normalised weight-gradient norm (Layer Card), bare backbone, 1 backward per batch"
    needs_stage_a = False

    def units(self, study: Study, rank: int, world: int) -> list[int]:
        return [0] if rank == 0 else []

    def cost(self, study: Study) -> int:
        return study.n_batches

    def compute(self, study: Study, gated: GatedLoRA, batches: Sequence[Any], progress: Journal,
                units: Sequence[int], memory_limit: int, tick: Callable[[int], None]) -> None:  # fmt: skip
        from fanlora.scoring import probes

        if units:
            probes.run_grad_norm(gated.model, gated.layout, batches, progress, study.n_tokens, tick)

    def assemble(self, study: Study, entries: dict[str, dict[str, Any]]) -> Assembled:
        from fanlora.errors import UserError

        if "all" not in entries:
            raise UserError("the scores are incomplete: no gradient norms yet — re-run `fanlora score` to finish")
        e = entries["all"]
        columns = {k: {"grad_norm": e["grad_norm"][k], "energy": e["energy"][k]} for k in study.keys}
        return {k: e["value"][k] for k in study.keys}, columns, None, None


register(GradNorm())
