"""Stage c under a cost budget: the modules that maximise the summed score with their summed cost ≤ a budget.

The paper keeps "at most K_max modules per layer"; users think in budgets — "at most 1 M trainable parameters
per task", "at most 2 % slower decoding". :func:`select_within` is a 0/1 knapsack over the (kind, layer)
modules with an optional per-layer cap (a group knapsack: per layer, one subset of at most K_max kinds), and,
like :func:`fanlora.stages.selection.select`, it never keeps a module with a negative score.

Costs of a module:

- ``params``: ``r1 · (in + out)`` from the backbone's shapes — what LoRA rank ``r1`` trains on it;
- ``latency``: the measured decode-time cost of LoRA on a module of that kind, from the backbone's profile
  (:mod:`fanlora.latency.profile`), as a fraction of the bare backbone's decode time.

Neither scipy nor PEFT has a knapsack (scipy's ``milp`` could solve it but adds nothing for a few hundred
0/1 items), so this is a dynamic programme over integer costs with numpy: ``params`` costs are exact integers
(divided by their common divisor); ``latency`` costs are rounded *up* to 1/4000 of the budget, so the
chosen set always fits the true budget and loses at most one grid step per kept module of optimality.
When the unconstrained choice (top K_max per layer) fits, it is returned as is — it is optimal, and a
loose budget then gives exactly the setting ``fanlora select`` would.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from fanlora.backbone import module_key
from fanlora.config import R1
from fanlora.errors import UserError
from fanlora.scoring.table import ScoreTable
from fanlora.setting import Setting
from fanlora.stages.selection import from_table, select

UNITS = {
    "params": "trainable parameters, e.g. params=1000000 or params=1M",
    "latency": "decode slowdown, e.g. latency=2%",
}
LATENCY_GRID = 4000  # grid steps per latency budget
_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


@dataclass(frozen=True)
class Budget:
    unit: str  # "params" or "latency"
    value: float  # parameters, or the allowed decode-time overhead as a fraction (0.02 for 2 %)

    def __str__(self) -> str:
        return f"params={int(self.value)}" if self.unit == "params" else f"latency={self.value * 100:g}%"

    def describe(self, cost: float) -> str:
        return f"{int(cost):,} parameters" if self.unit == "params" else f"{cost * 100:.2f}% decode time"


def parse_budget(text: str) -> Budget:
    """``params=N`` (k/M/G suffixes allowed) or ``latency=P%``; anything else is a UserError naming the fix."""
    unit, sep, raw = str(text).partition("=")
    unit, raw = unit.strip().lower(), raw.strip()
    if not sep or unit not in UNITS:
        hint = "; ".join(f"{u}: {why}" for u, why in UNITS.items())
        raise UserError(f"unknown budget {text!r}: use UNIT=VALUE with unit params or latency ({hint})")
    if unit == "params":
        m = re.fullmatch(r"(-?[0-9]+(?:\.[0-9]+)?)([kmgKMG]?)", raw)
        value = float(m.group(1)) * _SUFFIX[m.group(2).lower()] if m else math.nan
    else:
        m = re.fullmatch(r"(-?[0-9]+(?:\.[0-9]+)?)%", raw)
        value = float(m.group(1)) / 100 if m else math.nan
    if math.isnan(value):
        example = "params=1000000" if unit == "params" else "latency=2%"
        raise UserError(f"budget {text!r}: cannot read {raw!r} as a {unit} budget; write it like {example}")
    if value <= 0:
        raise UserError(f"budget {text!r} must be positive: nothing fits in a budget of {raw}")
    return Budget(unit, value)


def param_costs(table: ScoreTable, shapes: dict[str, tuple[int, int]], r1: int) -> dict[tuple[str, int], float]:
    """``r1 · (in + out)`` per (kind, layer); ``shapes`` maps full module names to (in, out)."""
    costs = {}
    for kind in table.kinds:
        for layer in range(table.num_layers):
            name = table.module_names[module_key(kind, layer)]
            if name not in shapes:
                raise UserError(f"the backbone has no linear module {name}: these scores belong to another backbone")
            fan_in, fan_out = shapes[name]
            costs[(kind, layer)] = float(r1 * (fan_in + fan_out))
    return costs


def latency_costs(table: ScoreTable, per_module: dict[str, float]) -> dict[tuple[str, int], float]:
    """The profile's decode-time fraction per module of each kind, for every layer."""
    missing = [k for k in table.kinds if k not in per_module]
    if missing:
        raise UserError(f"the latency profile has no cost for kind {missing[0]}: profile this backbone again")
    return {(k, n): max(0.0, float(per_module[k])) for k in table.kinds for n in range(table.num_layers)}


def _integer_costs(costs: dict[Any, float], budget: Budget) -> tuple[dict[Any, int], int]:
    """Costs and capacity on an integer grid: exact for parameters, rounded up for latency."""
    if budget.unit == "params":
        ints = {k: round(v) for k, v in costs.items()}
        step = math.gcd(*ints.values()) or 1
        return {k: v // step for k, v in ints.items()}, int(budget.value) // step
    unit = budget.value / LATENCY_GRID
    return {k: math.ceil(v / unit - 1e-9) for k, v in costs.items()}, LATENCY_GRID


def knapsack(
    scores: dict[tuple[str, int], float], costs: dict[tuple[str, int], int], capacity: int, layers: int,
    kinds: list[str], k_max: int | None,
) -> dict[int, list[str]]:  # fmt: skip
    """Per layer the subset of ≤ ``k_max`` kinds (no negative score) maximising the total score, cost ≤ capacity.

    A group knapsack over layers: ``best[c]`` is the highest score reachable with cost exactly ≤ c after the
    layers so far; each layer offers every admissible subset of its kinds. numpy does the inner loop.
    """
    neg = -np.inf
    best = np.zeros(capacity + 1)
    choices: list[np.ndarray] = []
    options_per_layer: list[list[tuple[str, ...]]] = []
    for layer in range(layers):
        usable = [k for k in kinds if scores[(k, layer)] >= 0 and costs[(k, layer)] <= capacity]
        cap = len(usable) if k_max is None else min(k_max, len(usable))
        options = [s for n in range(cap + 1) for s in itertools.combinations(usable, n)]
        new, pick = np.full(capacity + 1, neg), np.zeros(capacity + 1, dtype=np.int32)
        for i, subset in enumerate(options):
            cost = sum(costs[(k, layer)] for k in subset)
            if cost > capacity:
                continue
            value = sum(scores[(k, layer)] for k in subset)
            shifted = np.full(capacity + 1, neg)
            shifted[cost:] = best[: capacity + 1 - cost] + value
            better = shifted > new
            new[better], pick[better] = shifted[better], i
        best = new
        choices.append(pick)
        options_per_layer.append(options)
    c = int(np.argmax(best))
    kept: dict[int, list[str]] = {}
    for layer in range(layers - 1, -1, -1):
        subset = options_per_layer[layer][int(choices[layer][c])]
        kept[layer] = sorted(subset, key=lambda k: (-scores[(k, layer)], kinds.index(k)))
        c -= sum(costs[(k, layer)] for k in subset)
    return kept


def setting_cost(setting: Setting, costs: dict[tuple[str, int], float]) -> float:
    return sum(costs[(k, layer)] for layer, kinds in setting.kept.items() for k in kinds)


def select_within(
    table: ScoreTable, budget: Budget, costs: dict[tuple[str, int], float], k_max: int | None,
    source: dict[str, Any] | None = None,
) -> Setting:  # fmt: skip
    """The best setting whose summed cost fits ``budget`` (``k_max``: per-layer cap, None for none)."""
    cheapest = min(c for key, c in costs.items() if table.score(*key) >= 0) if costs else math.inf
    if cheapest > budget.value:
        raise UserError(
            f"budget {budget} is below the cheapest module with a non-negative score "
            f"({budget.describe(cheapest)}): raise the budget"
        )
    cap = k_max if k_max is not None else len(table.kinds)
    loose = select(table, cap, source)
    if setting_cost(loose, costs) <= budget.value:
        setting = loose
    else:
        scores = {(k, n): table.score(k, n) for k in table.kinds for n in range(table.num_layers)}
        ints, capacity = _integer_costs(costs, budget)
        kept = knapsack(scores, ints, capacity, table.num_layers, table.kinds, k_max)
        setting = from_table(table, kept, cap, source)
    if setting.n_modules == 0:
        raise UserError("every score is negative, so no module can be kept: score on more validation data")
    return setting


def module_shapes(backbone_name: str, module_map: dict[str, str] | None = None) -> dict[str, tuple[int, int]]:
    """(in, out) of every mapped module of the backbone, by full name (its layout's; Conv1D included).
    ``module_map`` (kind → path in a layer, as a setting records it) for backbones that need one."""
    from fanlora.backbone import load_backbone

    return dict(load_backbone(backbone_name, module_map=module_map).layout.shapes)


def table_module_map(table: ScoreTable) -> dict[str, str]:
    """kind → path inside a layer, as the scores name the modules (``<layers>.0.<path>``)."""
    return {k: table.module_names[f"{k}.0"].split(".0.", 1)[-1] for k in table.kinds}


def costs_for(
    table: ScoreTable, budget: Budget, r1: int, profile_path: str | None = None
) -> tuple[dict[tuple[str, int], float], dict[str, Any]]:
    """Every module's cost in the budget's unit, and what the setting should record of how it was costed."""
    if budget.unit == "params":
        if not isinstance(r1, int) or r1 < 1:
            raise UserError(f"--r1 must be a LoRA rank >= 1, got {r1!r}")
        shapes = module_shapes(table.backbone.get("source", "embedded"), table_module_map(table))
        costs = param_costs(table, shapes, r1)
        return costs, {"r1": r1, "cost": "r1 * (in + out) per module"}
    from fanlora.atomic import file_sha256
    from fanlora.latency import profile as latency

    where, prof = latency.find_profile(table.backbone, profile_path)
    record = {"profile": str(where), "profile_sha256_16": file_sha256(where)[:16], "profile_r": prof["r"]}
    warning = latency.resolution_warning(prof)
    if warning:
        record["profile_warning"] = warning
        print(f"warning: {warning}", file=sys.stderr)
    return latency_costs(table, latency.per_module(prof)), record


def budget_setting(
    table: ScoreTable, text: str, k_max: int | None, r1: int = R1, profile_path: str | None = None,
    source: dict[str, Any] | None = None, engine: str = "fanlora",
) -> Setting:  # fmt: skip
    """``fanlora select --budget``: parse, cost, solve; the setting records its budget and predicted cost."""
    budget = parse_budget(text)
    if k_max is not None and (not isinstance(k_max, int) or k_max < 1):
        raise UserError(f"k_max must be an integer >= 1 (or left out for no per-layer cap), got {k_max!r}")
    if engine == "vllm":
        return vllm_budget_setting(table, budget, k_max, profile_path, source)
    costs, record = costs_for(table, budget, r1, profile_path)
    setting = select_within(table, budget, costs, k_max, source)
    setting.source["budget"] = {
        "unit": budget.unit,
        "value": budget.value,
        "text": str(budget),
        "per_layer_cap": k_max,
        "predicted_cost": setting_cost(setting, costs),
        **record,
    }
    return setting


def select_by_groups(
    table: ScoreTable, budget: Budget, groups: dict[str, dict[str, Any]], k_max: int | None,
    source: dict[str, Any] | None = None,
) -> Setting:  # fmt: skip
    """Stock vLLM's cost model (:mod:`fanlora.latency.vllm_profile`): a group of kinds (``qkv_proj``: Q, K, V…)
    costs its ``slowdown`` once any layer uses one of its kinds. Every subset of groups within the budget is
    tried (four groups: sixteen subsets); in each, the top ``k_max`` non-negative kinds per layer among the
    subset's kinds are kept; the subset with the highest summed score wins (ties: the cheaper)."""
    cap = k_max if k_max is not None else len(table.kinds)
    best: tuple[float, float, dict[int, list[str]], tuple[str, ...]] | None = None
    names = sorted(groups)
    for n in range(1, len(names) + 1):
        for subset in itertools.combinations(names, n):
            cost = sum(max(0.0, groups[g]["slowdown"]) for g in subset)
            if cost > budget.value:
                continue
            allowed = {k for g in subset for k in groups[g]["kinds"]}
            kept = {
                layer: sorted(
                    (k for k in table.kinds if k in allowed and table.score(k, layer) >= 0),
                    key=lambda k, layer=layer: (-table.score(k, layer), table.kinds.index(k)),
                )[:cap]
                for layer in range(table.num_layers)
            }
            value = sum(table.score(k, layer) for layer, kinds in kept.items() for k in kinds)
            used = tuple(g for g in subset if any(k in groups[g]["kinds"] for kinds in kept.values() for k in kinds))
            if best is None or (value, -cost) > (best[0], -best[1]):
                best = (value, cost, kept, used)
    if best is None or not any(best[2].values()):
        cheapest = min(max(0.0, g["slowdown"]) for g in groups.values())
        raise UserError(
            f"budget {budget} is below vLLM's cheapest LoRA group ({cheapest * 100:.2f}% decode time, "
            "`fanlora profile --engine vllm`): raise the budget, or serve with the fanlora-vllm plugin, which "
            "charges per module (then select without --engine)"
        )
    value, cost, kept, used = best
    setting = from_table(table, kept, cap, source)
    setting.source["vllm_lora_target_modules"] = list(used)  # what to pass as vLLM's --lora-target-modules
    setting.source["vllm_predicted_cost"] = sum(max(0.0, groups[g]["slowdown"]) for g in used)
    return setting


def vllm_budget_setting(
    table: ScoreTable, budget: Budget, k_max: int | None, profile_path: str | None, source: dict[str, Any] | None
) -> Setting:
    """``select --budget latency=P% --engine vllm``: the best setting at what stock vLLM charges."""
    from fanlora.atomic import file_sha256
    from fanlora.latency import vllm_profile

    if budget.unit != "latency":
        raise UserError("--engine vllm costs latency, not parameters: use --budget latency=P% (or drop --engine)")
    where, prof = vllm_profile.read_vllm_profile(table.backbone, profile_path)
    setting = select_by_groups(table, budget, prof["groups"], k_max, source)
    setting.source["budget"] = {
        "unit": budget.unit, "value": budget.value, "text": str(budget), "per_layer_cap": k_max, "engine": "vllm",
        "predicted_cost": setting.source.pop("vllm_predicted_cost"), "profile": str(where),
        "profile_sha256_16": file_sha256(where)[:16], "profile_r": prof["r"],
    }  # fmt: skip
    return setting
