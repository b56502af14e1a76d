"""``ab-first-order``: eq. 3's two halves by their first-order Taylor estimates — gate gradients at all
gates 1 and at all gates 0, two forward-backward passes per batch (engine: :mod:`fanlora.scoring.gradient`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fanlora.scoring.scorers.registry import Assembled, Scorer, Study, register

if TYPE_CHECKING:  # annotations only (torch)
    from fanlora.gates import GatedLoRA
    from fanlora.scoring.journal import Journal


class FirstOrderAB(Scorer):
    name = "ab-first-order"
    summary = "eq. 3 to first order, 2 gradient passes per batch"

    def cost(self, study: Study) -> int:
        return 2 * study.n_batches

    def compute(self, study: Study, gated: GatedLoRA, batches: Sequence[Any], progress: Journal,
                units: Sequence[int], memory_limit: int, tick: Callable[[int], None]) -> None:  # fmt: skip
        from fanlora.scoring import gradient

        gradient.run(gradient.FIRST_ORDER_PASSES, False, gated, batches, progress, units, study.n_tokens, tick)

    def assemble(self, study: Study, entries: dict[str, dict[str, Any]]) -> Assembled:
        from fanlora.scoring import gradient

        return (*gradient.assemble_first_order(entries, study.keys, study.n_batches), None, None)


register(FirstOrderAB())
