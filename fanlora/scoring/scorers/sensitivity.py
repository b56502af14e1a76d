"""``sensitivity`` (Michel et al., 2019): mean |∂L/∂g| at all gates 1 — how much a module matters, not in
which direction; one gradient pass per batch (engine: :mod:`fanlora.scoring.gradient`)."""

from __future__ import annotations

from typing import Any

from fanlora.scoring.scorers.registry import Assembled, Scorer, register


class Sensitivity(Scorer):
    name = "sensitivity"
    summary = "|gate gradient|, 1 pass per batch"

    def cost(self, study: Any) -> int:
        return study.n_batches

    def compute(self, study: Any, gated: Any, batches: Any, progress: Any, units: Any, memory_limit: int,
                tick: Any) -> None:  # fmt: skip
        from fanlora.scoring import gradient

        gradient.run(gradient.SENSITIVITY_PASSES, True, gated, batches, progress, units, study.n_tokens, tick)

    def assemble(self, study: Any, entries: dict[str, dict[str, Any]]) -> Assembled:
        from fanlora.scoring import gradient

        return (*gradient.assemble_sensitivity(entries, study.keys, study.n_batches), None, None)


register(Sensitivity())
