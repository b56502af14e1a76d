"""``lora-drop``: LoRA-drop's importance (Zhou et al., "LoRA-drop: Efficient LoRA Parameter Pruning based on
Output Evaluation", COLING 2025) — the mean squared norm of each module's LoRA output, ``||s·B A x||²``, on the
validation set after a short LoRA run, normalised to sum to 1. The short run is our stage a (all gates on); one
forward pass per validation batch (engine: :mod:`fanlora.scoring.probes`).

LoRA-drop keeps the layers that hold a set share of the importance and shares one LoRA among the rest; only its
importance is used here, per (kind, layer), so ``fanlora select`` and budgets treat it as every other score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fanlora.scoring.scorers.registry import Assembled, Scorer, Study, register

if TYPE_CHECKING:  # annotations only (torch)
    from fanlora.gates import GatedLoRA
    from fanlora.scoring.journal import Journal


class LoraDrop(Scorer):
    name = "lora-drop"
    summary = "LoRA-drop: stage a's LoRA output norm, 1 forward per batch"

    def cost(self, study: Study) -> int:
        return study.n_batches

    def compute(self, study: Study, gated: GatedLoRA, batches: Sequence[Any], progress: Journal,
                units: Sequence[int], memory_limit: int, tick: Callable[[int], None]) -> None:  # fmt: skip
        from fanlora.scoring import probes

        gated.set_all(True)
        probes.run_lora_out(gated.model.get_base_model(), gated.layout, batches, progress, units, tick)

    def assemble(self, study: Study, entries: dict[str, dict[str, Any]]) -> Assembled:
        from fanlora.scoring import probes

        out = probes.mean_per_token(entries, study.keys, study.n_batches)
        total = sum(out.values()) or 1.0
        return {k: v / total for k, v in out.items()}, {k: {"mean_sq_norm": out[k]} for k in study.keys}, None, None


register(LoraDrop())
