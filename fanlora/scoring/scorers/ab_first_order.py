"""``ab-first-order``: eq. 3's two halves by their first-order Taylor estimates — gate gradients at all
gates 1 and at all gates 0, two forward-backward passes per batch (engine: :mod:`fanlora.scoring.gradient`)."""

from __future__ import annotations

from typing import Any

from fanlora.scoring.scorers.registry import Assembled, Scorer, register


class FirstOrderAB(Scorer):
    name = "ab-first-order"
    summary = "eq. 3 to first order, 2 gradient passes per batch"

    def cost(self, study: Any) -> int:
        return 2 * study.n_batches

    def compute(self, study: Any, gated: Any, batches: Any, progress: Any, units: Any, memory_limit: int,
                tick: Any) -> None:  # fmt: skip
        from fanlora.scoring import gradient

        gradient.run(gradient.FIRST_ORDER_PASSES, False, gated, batches, progress, units, study.n_tokens, tick)

    def assemble(self, study: Any, entries: dict[str, dict[str, Any]]) -> Assembled:
        from fanlora.scoring import gradient

        return (*gradient.assemble_first_order(entries, study.keys, study.n_batches), None, None)


register(FirstOrderAB())
