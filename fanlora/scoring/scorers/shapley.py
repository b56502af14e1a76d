"""``shapley``: Monte-Carlo Shapley values of the modules, ``score.shapley_budget`` sampled permutations
(seed ``score.seed``), one permutation a unit of work (engine: :mod:`fanlora.scoring.shapley`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fanlora.errors import UserError
from fanlora.scoring.scorers.registry import Assembled, Scorer, Study, register

if TYPE_CHECKING:  # annotations only (torch)
    from fanlora.gates import GatedLoRA
    from fanlora.scoring.journal import Journal


class Shapley(Scorer):
    name = "shapley"
    summary = "sampled Shapley values, --budget permutations"

    def options(self, sc: Any) -> dict[str, Any]:
        options = {"budget": sc.shapley_budget, "seed": sc.seed}
        self.check(options)
        return options

    def check(self, options: dict[str, Any]) -> None:
        budget = options.get("budget")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise UserError(f"the Shapley budget must be at least 1 permutation, got {budget!r}: e.g. --budget 8")

    def units(self, study: Study, rank: int, world: int) -> list[int]:
        return [u for u in range(study.options["budget"]) if u % world == rank]

    def cost(self, study: Study) -> int:
        return study.options["budget"]

    def compute(self, study: Study, gated: GatedLoRA, batches: Sequence[Any], progress: Journal,
                units: Sequence[int], memory_limit: int, tick: Callable[[int], None]) -> None:  # fmt: skip
        from fanlora.scoring import shapley

        shapley.run(gated, batches, progress, units, study.options["seed"], memory_limit, study.players, tick)

    def assemble(self, study: Study, entries: dict[str, dict[str, Any]]) -> Assembled:
        from fanlora.scoring import shapley

        o = study.options
        values, columns = shapley.assemble(entries, study.players, o["budget"], o["seed"], study.n_batches,
                                           study.n_tokens)  # fmt: skip
        return values, columns, None, None


register(Shapley())
