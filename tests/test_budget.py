"""Budget-aware selection: the knapsack against brute force, its guarantees, and the CLI's refusals."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from helpers import fail

from fanlora.errors import UserError
from fanlora.scoring.table import ScoreTable
from fanlora.stages import budget as fb
from fanlora.stages.selection import select

KINDS = ["Q", "K", "V"]


def small_table(values: dict[tuple[str, int], float], layers: int) -> ScoreTable:
    keys = [(k, n) for n in range(layers) for k in KINDS]
    return ScoreTable(
        backbone={"name": "hand", "weights_digest": "x"},
        kinds=list(KINDS),
        num_layers=layers,
        module_names={f"{k}.{n}": f"model.layers.{n}.self_attn.{k.lower()}_proj" for k, n in keys},
        values={f"{k}.{n}": values[(k, n)] for k, n in keys},
    )


def brute_force(table: ScoreTable, costs: dict, capacity: float, k_max: int | None) -> float:
    """The best total score over every subset that fits (the knapsack's definition, by enumeration)."""
    keys = [(k, n) for n in range(table.num_layers) for k in KINDS if table.score(k, n) >= 0]
    best = 0.0
    for size in range(len(keys) + 1):
        for subset in itertools.combinations(keys, size):
            per_layer = [sum(1 for _, n in subset if n == layer) for layer in range(table.num_layers)]
            if k_max is not None and max(per_layer, default=0) > k_max:
                continue
            if sum(costs[key] for key in subset) <= capacity:
                best = max(best, sum(table.score(*key) for key in subset))
    return best


def chosen(setting) -> list[tuple[str, int]]:
    return [(k, n) for n, kinds in setting.kept.items() for k in kinds]


@pytest.mark.parametrize("case", range(40))
def test_params_knapsack_is_optimal_and_respects_budget_and_cap(case):
    rng = random.Random(case)
    layers = rng.choice([2, 3])
    table = small_table({(k, n): round(rng.uniform(-0.5, 1.0), 3) for k in KINDS for n in range(layers)}, layers)
    costs = {(k, n): float(rng.choice([2, 3, 4, 6, 9])) for k in KINDS for n in range(layers)}
    k_max = rng.choice([None, 1, 2])
    cheapest = min(c for key, c in costs.items() if table.score(*key) >= 0)
    value = rng.randint(int(cheapest), int(sum(costs.values())))
    setting = fb.select_within(table, fb.Budget("params", value), costs, k_max)
    picked = chosen(setting)
    assert sum(costs[key] for key in picked) <= value
    assert all(table.score(*key) >= 0 for key in picked)
    if k_max is not None:
        assert all(len(kinds) <= k_max for kinds in setting.kept.values())
    total = sum(table.score(*key) for key in picked)
    assert total == pytest.approx(brute_force(table, costs, value, k_max))


def test_hand_checked_case_prefers_two_cheap_modules_to_one_dear_one():
    # Q.0 scores best alone (1.0, cost 5); K.0 + V.0 together score 1.2 for cost 4; budget 5.
    table = small_table({("Q", 0): 1.0, ("K", 0): 0.6, ("V", 0): 0.6}, 1)
    costs = {("Q", 0): 5.0, ("K", 0): 2.0, ("V", 0): 2.0}
    setting = fb.select_within(table, fb.Budget("params", 5), costs, None)
    assert setting.kept == {0: ["K", "V"]}
    capped = fb.select_within(table, fb.Budget("params", 5), costs, 1)
    assert capped.kept == {0: ["Q"]}  # one module per layer: the single best that fits


@pytest.mark.parametrize("k_max", [1, 2, 3])
def test_loose_budget_equals_top_k_max(k_max):
    rng = random.Random(7)
    table = small_table({(k, n): round(rng.uniform(-0.5, 1.0), 2) for k in KINDS for n in range(4)}, 4)
    costs = {key: 10.0 for key in itertools.product(KINDS, range(4))}
    setting = fb.select_within(table, fb.Budget("params", 10_000), costs, k_max)
    assert setting.kept == select(table, k_max).kept


def test_latency_costs_are_rounded_up_so_the_true_cost_fits():
    rng = random.Random(3)
    table = small_table({(k, n): rng.uniform(0, 1) for k in KINDS for n in range(3)}, 3)
    per_module = {"Q": 0.00213, "K": 0.00071, "V": 0.00119}
    costs = fb.latency_costs(table, per_module)
    for value in (0.002, 0.0035, 0.005, 0.0071):
        setting = fb.select_within(table, fb.Budget("latency", value), costs, 2)
        assert fb.setting_cost(setting, costs) <= value + 1e-12
        assert sum(table.score(*key) for key in chosen(setting)) == pytest.approx(
            brute_force(table, costs, value, 2), rel=0.02
        )


@pytest.mark.parametrize(
    ("text", "unit", "value"),
    [("params=1M", "params", 1_000_000), ("params=250k", "params", 250_000), ("latency=2.5%", "latency", 0.025)],
)
def test_parse_budget(text, unit, value):
    b = fb.parse_budget(text)
    assert (b.unit, b.value) == (unit, pytest.approx(value))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("speed=3", "unknown budget"),
        ("params", "unknown budget"),
        ("params=0", "must be positive"),
        ("latency=-1%", "must be positive"),
        ("latency=2", "write it like latency=2%"),
        ("params=lots", "write it like params="),
    ],
)
def test_bad_budgets_say_what_to_write(text, words):
    with pytest.raises(UserError, match=words):
        fb.parse_budget(text)


def test_budget_below_the_cheapest_module_is_refused():
    table = small_table({(k, 0): 1.0 for k in KINDS}, 1)
    with pytest.raises(UserError, match="below the cheapest module"):
        fb.select_within(table, fb.Budget("params", 1), {(k, 0): 2.0 for k in KINDS}, None)


@pytest.mark.e2e
def test_select_budget_cli_records_budget_and_predicted_cost(searched_run, tmp_path, capsys):
    from fanlora.cli import main

    _, run = searched_run
    out = tmp_path / "setting.json"
    scores = str(run / "scores.json")
    assert main(["select", "--scores", scores, "--budget", "params=3000", "--r1", "4", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    b = data["source"]["budget"]
    assert b["unit"] == "params" and b["value"] == 3000 and b["r1"] == 4
    assert 0 < b["predicted_cost"] <= 3000 and data["n_modules"] >= 1
    for argv, words in [
        (["--budget", "watts=3"], "unknown budget"),
        (["--budget", "params=0"], "must be positive"),
        (["--budget", "params=1"], "below the cheapest module"),
        (["--budget", "params=3000", "--k-max", "0"], "--k-max must be >= 1"),
        (["--profile", "p.json"], "only used with --budget"),
    ]:
        target = tmp_path / "refused.json"
        assert words in fail(capsys, ["select", "--scores", scores, "--out", str(target), *argv])
        assert not target.exists()


@pytest.mark.e2e
def test_latency_budget_without_a_profile_names_the_command(searched_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FANLORA_CACHE", str(tmp_path / "cache"))
    _, run = searched_run
    line = fail(capsys, ["select", "--scores", str(run / "scores.json"), "--budget", "latency=2%"])
    assert "fanlora profile --backbone" in line
