"""The scorer protocol: what stage b asks of a scorer, and the registry that finds one by name.

A scorer declares its work *units* (what one process computes and journals at a time — layers, validation
batches, permutations), their *cost* (for the progress bar), how to *compute* a process's units and how to
*assemble* the table from everyone's entries, and which ``score.*`` config values it reads (its *options*,
recorded with the scores so a re-run with other options is refused). ``fanlora.scoring.study`` and
``fanlora.stages.score`` run any scorer through this protocol and never test a scorer's name.

Declarations are light (no torch at import): the CLI builds ``--scorer``'s choices and help from
:func:`names` and each scorer's ``summary``; the engines are imported inside ``compute``/``assemble``.
Adding a scorer is one file in ``fanlora/scoring/scorers/`` that calls :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from fanlora.registry import Registry

if TYPE_CHECKING:  # annotations only: importing these needs torch (none of them imports the scorers back)
    from fanlora.config import ScoreConfig
    from fanlora.gates import GatedLoRA
    from fanlora.scoring.journal import Journal


class Study(Protocol):
    """The contract between stage b and a scorer: what a scorer may read of the study it runs in. The study
    itself (:class:`fanlora.scoring.study.Study`) satisfies it; defining it here keeps the registry free of an
    import of the study, which imports the registry."""

    method: str
    kinds: list[str]
    num_layers: int
    module_names: dict[str, str]  # kind → path inside a layer
    n_batches: int  # validation batches
    n_tokens: int  # scored response tokens over all batches
    options: dict[str, Any]  # the scorer's own (shapley: budget, seed)

    @property
    def keys(self) -> list[str]:  # "V.3", layer-major
        ...

    @property
    def players(self) -> list[tuple[str, int]]:  # (kind, layer), layer-major
        ...


#: What assemble returns: (values, columns, S_all, S_null) — the last two only for eq. 3's exact scorer.
Assembled = tuple[dict[str, float], dict[str, dict[str, float]], float | None, float | None]


class Scorer:
    """One stage-b scorer. Subclasses set ``name`` and ``summary`` and implement cost, compute and assemble."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `fanlora score --help`
    paper: ClassVar[bool] = False  # the paper's scorer writes scores.json; the others scores-<name>.json
    #: False for a scorer of the bare backbone: it is handed a :class:`~fanlora.scoring.study.BareModel` in place
    #: of the gated stage-a model, and `fanlora score` runs without a stage a.
    needs_stage_a: ClassVar[bool] = True

    def options(self, sc: ScoreConfig) -> dict[str, Any]:
        """The ``score.*`` values this scorer reads beyond the common ones, checked (recorded in the scores)."""
        return {}

    def check(self, options: dict[str, Any]) -> None:
        """Refuse options this scorer cannot run with (one line naming the fix)."""

    def units(self, study: Study, rank: int, world: int) -> list[int]:
        """This process's share of the work; by default every ``world``-th validation batch."""
        return [u for u in range(study.n_batches) if u % world == rank]

    def cost(self, study: Study) -> int:
        raise NotImplementedError

    def compute(self, study: Study, gated: GatedLoRA, batches: Sequence[Any], progress: Journal,
                units: Sequence[int], memory_limit: int, tick: Callable[[int], None]) -> None:  # fmt: skip
        raise NotImplementedError

    def assemble(self, study: Study, entries: dict[str, dict[str, Any]]) -> Assembled:
        raise NotImplementedError

    @property
    def stem(self) -> str:
        return "scores" if self.paper else f"scores-{self.name}"


_REGISTRY: Registry[Scorer] = Registry(
    "scorer", "unknown scoring method {name}: choose one of {known}", lambda n, s: (not s.paper, n)
)


def register(scorer: Scorer, replace: bool = False) -> Scorer:
    return _REGISTRY.register(scorer.name, scorer, replace)


unregister, get = _REGISTRY.unregister, _REGISTRY.get
names = _REGISTRY.names  # the paper's first


def described() -> str:
    """``name: summary; …`` for help texts."""
    return "; ".join(f"{n}: {get(n).summary}" for n in names())
