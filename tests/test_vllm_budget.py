"""Latency budgets at stock vLLM's prices: a group of kinds costs once, whatever layers use it."""

from __future__ import annotations

import itertools
import json

import pytest
from helpers import fail
from test_budget import KINDS, small_table

from fanlora.errors import UserError
from fanlora.latency.vllm_profile import VLLM_PROFILE_FORMAT, groups_of
from fanlora.stages import budget as fb

GROUPS = {"qk": {"kinds": ["Q", "K"], "slowdown": 0.30}, "v": {"kinds": ["V"], "slowdown": 0.10}}


def test_groups_follow_vllms_packing():
    paths = {"Q": "self_attn.q_proj", "K": "self_attn.k_proj", "V": "self_attn.v_proj", "O": "self_attn.o_proj"}
    paths |= {"G": "mlp.gate_proj", "U": "mlp.up_proj", "D": "mlp.down_proj"}
    assert groups_of(paths) == {
        "qkv_proj": ["Q", "K", "V"], "o_proj": ["O"], "gate_up_proj": ["G", "U"], "down_proj": ["D"],
    }  # fmt: skip


@pytest.mark.parametrize("budget", [0.10, 0.35, 0.40, 1.0])
def test_the_best_affordable_group_subset_wins(budget):
    values = {("Q", 0): 2.0, ("K", 0): 1.0, ("V", 0): 0.5, ("Q", 1): -1.0, ("K", 1): 0.2, ("V", 1): 0.4}
    table = small_table(values, 2)
    setting = fb.select_by_groups(table, fb.Budget("latency", budget), GROUPS, 2)
    best = 0.0
    for n in range(1, len(GROUPS) + 1):  # by hand: each affordable subset's top-2 non-negative kinds per layer
        for subset in itertools.combinations(GROUPS, n):
            if sum(GROUPS[g]["slowdown"] for g in subset) > budget:
                continue
            allowed = [k for g in subset for k in GROUPS[g]["kinds"]]
            per_layer = [
                sorted((values[(k, n)] for k in allowed if values[(k, n)] >= 0), reverse=True)[:2] for n in (0, 1)
            ]
            best = max(best, sum(map(sum, per_layer)))
    got = sum(table.score(k, layer) for layer, kinds in setting.kept.items() for k in kinds)
    assert got == pytest.approx(best)
    used = setting.source["vllm_lora_target_modules"]
    assert sum(GROUPS[g]["slowdown"] for g in used) <= budget
    assert {k for kinds in setting.kept.values() for k in kinds} <= {k for g in used for k in GROUPS[g]["kinds"]}


def test_a_budget_below_every_group_names_the_plugin():
    table = small_table({(k, 0): 1.0 for k in KINDS}, 1)
    with pytest.raises(UserError, match="fanlora-vllm plugin"):
        fb.select_by_groups(table, fb.Budget("latency", 0.05), GROUPS, 2)


@pytest.mark.e2e
def test_select_engine_vllm_cli_records_the_target_modules(searched_run, tmp_path, capsys):
    from fanlora.cli import main
    from fanlora.scoring.table import ScoreTable

    _, run = searched_run
    scores = str(run / "scores.json")
    table = ScoreTable.read(scores)
    profile = tmp_path / "vllm-profile.json"
    groups = {g: {"kinds": kinds, "slowdown": 0.2, "ratios": [0.2]} for g, kinds in groups_of(
        {k: table.module_names[f"{k}.0"].split(".0.", 1)[-1] for k in table.kinds}).items()}  # fmt: skip
    record = {"format": VLLM_PROFILE_FORMAT, "backbone": table.backbone, "r": 12, "groups": groups}
    profile.write_text(json.dumps(record))
    out = tmp_path / "setting.json"
    argv = ["select", "--scores", scores, "--budget", "latency=45%", "--engine", "vllm", "--profile", str(profile)]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["source"]["budget"]["engine"] == "vllm" and data["source"]["budget"]["predicted_cost"] <= 0.45
    assert 1 <= len(data["source"]["vllm_lora_target_modules"]) <= 2
    assert "--budget latency" in fail(capsys, ["select", "--scores", scores, "--engine", "vllm"])
    params = [*argv[:3], "--budget", "params=3000", "--engine", "vllm", "--profile", str(profile)]
    assert "not parameters" in fail(capsys, params)
    assert "fanlora profile --engine vllm" in fail(capsys, [*argv[:7], "--profile", str(tmp_path / "none.json")])
