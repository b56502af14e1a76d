"""Stage c's selection rules: from a score table to a setting.

:func:`select` keeps at most ``k_max`` modules per layer, highest score first, and never a module whose score is
negative — so a layer may keep fewer than ``k_max``, even none. :func:`select_by_rule` makes the settings a study
compares it with. (The stage's entry, with budgets and figures, is :mod:`fanlora.stages.select`; the artifact
itself is :mod:`fanlora.setting`.)
"""

from __future__ import annotations

import random
from typing import Any

from fanlora.backbone import KINDS
from fanlora.errors import UserError
from fanlora.scoring.table import ScoreTable
from fanlora.setting import Setting


def _check_k_max(k_max: Any) -> None:
    if not isinstance(k_max, int) or isinstance(k_max, bool) or k_max < 1:
        raise UserError(f"k_max must be an integer >= 1, got {k_max!r}: the paper uses 2")


def from_table(table: ScoreTable, kept: dict[int, list[str]], k_max: int, source: dict[str, Any] | None) -> Setting:
    """A setting keeping ``kept`` (layer → kinds) on the backbone and module layout the scores describe."""
    unknown = [k for k in table.kinds if k not in KINDS]
    if unknown:
        raise UserError(f"the scores name unknown module kind {unknown[0]!r}: kinds are {', '.join(KINDS)}")
    paths: dict[str, str] = {}
    layers_path = None
    for kind in table.kinds:
        full = table.module_names[f"{kind}.0"]
        prefix, rest = full.split(".0.", 1) if ".0." in full else (None, None)
        if prefix is None:
            raise UserError(f"cannot read the layer list from module name {full!r} in the scores")
        layers_path = prefix
        paths[kind] = rest
    return Setting(
        backbone=table.backbone,
        layers_path=str(layers_path),
        num_layers=table.num_layers,
        module_paths=paths,
        k_max=k_max,
        kept=kept,
        source=dict(source or {}),
    )


RULES = ("top", "inverse", "all", "random:SEED", "fixed:KINDS", "budget:UNIT=VALUE")


def check_rule(rule: Any) -> None:
    """Refuse a malformed setting rule before any work (the kinds of ``fixed:`` are checked against scores).

    ``budget:`` rules are made by :func:`fanlora.stages.budget.budget_setting` (the experiment runner dispatches them);
    their budget text is checked there.
    """
    kind, _, arg = str(rule).partition(":")
    ok = (kind in ("top", "inverse", "all") and not arg) or (kind == "random" and arg.isdigit())
    ok = ok or (kind in ("fixed", "budget") and bool(arg))
    if not isinstance(rule, str) or not ok:
        raise UserError(f"unknown setting rule {rule!r}: use one of {', '.join(RULES)}")


def select_by_rule(table: ScoreTable, rule: str, k_max: int = 2, source: dict[str, Any] | None = None) -> Setting:
    """Settings to compare the AB-score's choice with, all of ``k_max`` modules per layer:

    - ``top``: the method itself (:func:`select`);
    - ``inverse``: the ``k_max`` *lowest*-scoring kinds of every layer, whatever their sign — if it does as
      well as ``top``, the score carries no information;
    - ``random:SEED``: ``k_max`` kinds per layer drawn uniformly, independently per layer;
    - ``fixed:Q,V`` (any kinds): the same kinds in every layer, as LoRA is used without a search;
    - ``all``: every module of every layer (LoRA as PEFT users apply it to all linear layers).
    """
    _check_k_max(k_max)
    kind, _, arg = rule.partition(":")
    source = {**(source or {}), "rule": rule}
    if kind == "top" and not arg:
        return select(table, k_max, source)
    layers = range(table.num_layers)
    if kind == "inverse" and not arg:
        kept = {n: sorted(table.kinds, key=lambda k: (table.score(k, n), table.kinds.index(k)))[:k_max] for n in layers}
    elif kind == "random" and arg.isdigit():
        rng = random.Random(int(arg))
        kept = {n: rng.sample(table.kinds, min(k_max, len(table.kinds))) for n in layers}
    elif kind == "all" and not arg:
        kept = {n: list(table.kinds) for n in layers}
        k_max = len(table.kinds)
    elif kind == "fixed" and arg:
        kinds = [k.strip() for k in arg.split(",")]
        bad = [k for k in kinds if k not in table.kinds]
        if bad:
            raise UserError(f"setting rule {rule!r}: unknown kind {bad[0]!r}; kinds are {', '.join(table.kinds)}")
        kept = {n: list(kinds) for n in layers}
        k_max = len(kinds)
    else:
        check_rule(rule)
        raise AssertionError(rule)
    return from_table(table, kept, k_max, source)


def select(table: ScoreTable, k_max: int = 2, source: dict[str, Any] | None = None) -> Setting:
    """Stage c: per layer, the top ``k_max`` non-negative scores (ties: paper kind order)."""
    _check_k_max(k_max)
    kept: dict[int, list[str]] = {}
    for layer in range(table.num_layers):
        ranked = sorted(table.kinds, key=lambda k: (-table.score(k, layer), table.kinds.index(k)))
        kept[layer] = [k for k in ranked if table.score(k, layer) >= 0][:k_max]
    setting = from_table(table, kept, k_max, source)
    if setting.n_modules == 0:
        raise UserError(
            "every score is negative, so no module can be kept: check that stage a trained "
            "(its val loss should fall) and score on more validation data"
        )
    return setting
