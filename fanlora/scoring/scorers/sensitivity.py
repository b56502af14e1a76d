"""``sensitivity`` (Michel et al., 2019): mean |∂L/∂g| at all gates 1 — how much a module matters, not in
which direction; one gradient pass per batch (engine: :mod:`fanlora.scoring.gradient`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fanlora.scoring.scorers.registry import Assembled, Scorer, Study, register

if TYPE_CHECKING:  # annotations only (torch)
    from fanlora.gates import GatedLoRA
    from fanlora.scoring.journal import Journal


class Sensitivity(Scorer):
    name = "sensitivity"
    summary = "|gate gradient|, 1 pass per batch"

    def cost(self, study: Study) -> int:
        return study.n_batches

    def compute(self, study: Study, gated: GatedLoRA, batches: Sequence[Any], progress: Journal,
                units: Sequence[int], memory_limit: int, tick: Callable[[int], None]) -> None:  # fmt: skip
        from fanlora.scoring import gradient

        gradient.run(gradient.SENSITIVITY_PASSES, True, gated, batches, progress, units, study.n_tokens, tick)

    def assemble(self, study: Study, entries: dict[str, dict[str, Any]]) -> Assembled:
        from fanlora.scoring import gradient

        return (*gradient.assemble_sensitivity(entries, study.keys, study.n_batches), None, None)


register(Sensitivity())
