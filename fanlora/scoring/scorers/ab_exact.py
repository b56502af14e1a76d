"""``ab-exact``: the paper's eq. 3, exactly — 2 + 2·N·L forward passes, split by layers over processes
(engine: :mod:`fanlora.scoring.exact`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fanlora.scoring.scorers.registry import Assembled, Scorer, Study, register

if TYPE_CHECKING:  # annotations only (torch)
    from fanlora.gates import GatedLoRA
    from fanlora.scoring.journal import Journal


class ExactAB(Scorer):
    name = "ab-exact"
    summary = "the paper's eq. 3, exact (default)"
    paper = True

    def units(self, study: Study, rank: int, world: int) -> list[int]:
        from fanlora.scoring import exact

        return exact.assign_layers(study.num_layers, world)[rank]

    def cost(self, study: Study) -> int:
        return 2 + 2 * len(study.keys)  # passes

    def compute(self, study: Study, gated: GatedLoRA, batches: Sequence[Any], progress: Journal,
                units: Sequence[int], memory_limit: int, tick: Callable[[int], None]) -> None:  # fmt: skip
        from fanlora.scoring import exact

        exact.run(gated, batches, progress, units, memory_limit, tick)

    def assemble(self, study: Study, entries: dict[str, dict[str, Any]]) -> Assembled:
        from fanlora.scoring import exact

        return exact.assemble(entries, study.keys, study.n_batches, study.n_tokens)


register(ExactAB())
