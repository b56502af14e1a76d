"""One interface over every scorer: which units of work exist, who computes which, how results combine.

A *study* is (backbone, stage-a adapter, validation batches, scorer and its options). Its work splits into
the scorer's units (:mod:`fanlora.scoring.scorers`) — layers for ``ab-exact``, validation batches for the
gradient scorers, permutations for ``shapley`` — assigned deterministically to ``world`` processes
(``torch.distributed`` ranks or manual ``--shard i/n`` runs). Every finished unit is appended to a partial
file (resume after a kill), and :func:`assemble` builds the score table from the union of everyone's
entries, refusing an incomplete set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fanlora.backbone import ModuleLayout, module_key
from fanlora.gates import GatedLoRA
from fanlora.scoring import scorers
from fanlora.scoring.journal import Journal
from fanlora.scoring.replay import Batch
from fanlora.scoring.table import ScoreTable

SHARD_FORMAT = "fanlora-scores-shard/2"  # /2: the scorer's options in one mapping


@dataclass
class BareModel:
    """What a scorer that needs no stage a (``needs_stage_a = False``) is handed in place of a gated model."""

    model: nn.Module
    layout: ModuleLayout


@dataclass
class Study:
    """What is scored and how: everything needed to assemble a table from recorded entries."""

    method: str
    kinds: list[str]
    num_layers: int
    module_names: dict[str, str]
    n_batches: int
    n_tokens: int
    options: dict[str, Any] = field(default_factory=dict)  # the scorer's own (shapley: budget, seed)

    def __post_init__(self) -> None:
        scorers.get(self.method).check(self.options)

    @property
    def scorer(self) -> scorers.Scorer:
        return scorers.get(self.method)

    @property
    def keys(self) -> list[str]:
        return [module_key(k, layer) for layer in range(self.num_layers) for k in self.kinds]

    @property
    def players(self) -> list[tuple[str, int]]:
        return [(k, layer) for layer in range(self.num_layers) for k in self.kinds]

    @property
    def stem(self) -> str:
        return self.scorer.stem

    def units(self, rank: int, world: int) -> list[int]:
        return self.scorer.units(self, rank, world)

    def cost(self) -> int:
        """Progress-bar units: passes for ab-exact, forward-backward passes or permutations otherwise."""
        return self.scorer.cost(self)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compute(
    study: Study,
    gated: GatedLoRA | BareModel,
    batches: Sequence[Batch],
    progress: Journal,
    units: Sequence[int],
    memory_limit: int,
    tick: Callable[[int], None] = lambda n: None,
) -> None:
    """Compute (or finish) this process's units, recording each as it completes."""
    study.scorer.compute(study, gated, batches, progress, units, memory_limit, tick)


def assemble(study: Study, entries: dict[str, dict[str, Any]]) -> ScoreTable:
    """The score table from the union of every process's entries (backbone and meta filled in by the caller)."""
    values, columns, s_all, s_null = study.scorer.assemble(study, entries)
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
