"""One interface over every scorer: which units of work exist, who computes which, how results combine.

A *study* is (backbone, stage-a adapter, validation batches, method and its options). Its work splits into
units — layers for ``ab-exact``, validation batches for the gradient scorers, permutations for ``shapley``
— that are assigned deterministically to ``world`` processes (``torch.distributed`` ranks or manual
``--shard i/n`` runs). Every finished unit is appended to a partial file (resume after a kill), and
:func:`assemble` builds the score table from the union of everyone's entries, refusing an incomplete set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fanlora.errors import UserError
from fanlora.gates import GatedLoRA
from fanlora.score_table import ScoreTable
from fanlora.scoring import exact, gradient, shapley
from fanlora.scoring.journal import Journal
from fanlora.scoring.replay import Batch

METHODS = ("ab-exact", "ab-first-order", "sensitivity", "shapley")
SHARD_FORMAT = "fanlora-scores-shard/1"


@dataclass
class Study:
    """What is scored and how: everything needed to assemble a table from recorded entries."""

    method: str
    kinds: list[str]
    num_layers: int
    module_names: dict[str, str]
    n_batches: int
    n_tokens: int
    budget: int = 0  # shapley: permutations
    seed: int = 0  # shapley: which permutations

    def __post_init__(self) -> None:
        check_method(self.method, self.budget)

    @property
    def keys(self) -> list[str]:
        return [f"{k}.{layer}" for layer in range(self.num_layers) for k in self.kinds]

    @property
    def players(self) -> list[tuple[str, int]]:
        return [(k, layer) for layer in range(self.num_layers) for k in self.kinds]

    @property
    def stem(self) -> str:
        return stem_for(self.method)

    def units(self, rank: int, world: int) -> list[int]:
        if self.method == "ab-exact":
            return exact.assign_layers(self.num_layers, world)[rank]
        count = self.budget if self.method == "shapley" else self.n_batches
        return [u for u in range(count) if u % world == rank]

    def cost(self) -> int:
        """Journal-bar units: passes for ab-exact, forward-backward passes or permutations otherwise."""
        if self.method == "ab-exact":
            return 2 + 2 * len(self.keys)
        if self.method == "shapley":
            return self.budget
        return self.n_batches * len(gradient.passes(self.method))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def stem_for(method: str) -> str:
    """Output name: scores.json for the paper's method, scores-<method>.json for the others."""
    return "scores" if method == "ab-exact" else f"scores-{method}"


def check_method(method: str, budget: int) -> None:
    if method not in METHODS:
        raise UserError(f"unknown scoring method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "shapley" and (not isinstance(budget, int) or budget < 1):
        raise UserError(f"the Shapley budget must be at least 1 permutation, got {budget!r}: e.g. --budget 8")


def compute(
    study: Study,
    gated: GatedLoRA,
    batches: Sequence[Batch],
    progress: Journal,
    units: Sequence[int],
    memory_limit: int,
    tick: Callable[[int], None] = lambda n: None,
) -> None:
    """Compute (or finish) this process's units, recording each as it completes."""
    if study.method == "ab-exact":
        exact.run(gated, batches, progress, units, memory_limit, tick)
    elif study.method == "shapley":
        shapley.run(gated, batches, progress, units, study.seed, memory_limit, study.players, tick)
    else:
        gradient.run(study.method, gated, batches, progress, units, study.n_tokens, tick)


def assemble(study: Study, entries: dict[str, dict[str, Any]]) -> ScoreTable:
    """The score table from the union of every process's entries (backbone and meta filled in by the caller)."""
    s_all = s_null = None
    if study.method == "ab-exact":
        values, columns, s_all, s_null = exact.assemble(entries, study.keys, study.n_batches, study.n_tokens)
    elif study.method == "shapley":
        values, columns = shapley.assemble(
            entries, study.players, study.budget, study.seed, study.n_batches, study.n_tokens
        )
    else:
        values, columns = gradient.assemble(study.method, entries, study.keys, study.n_batches)
    return ScoreTable(
        backbone={},
        kinds=study.kinds,
        num_layers=study.num_layers,
        module_names=study.module_names,
        values=values,
        columns=columns,
        method=study.method,
        s_all=s_all,
        s_null=s_null,
    )
