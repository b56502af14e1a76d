"""SSP (sparse structure search): budget-shifted gates train, the chosen structure fits the budget, the
retrained model starts as the backbone, saves and loads; and it runs as a grid method."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import IDS, examples, grid_config, retrains_from_the_backbone_and_round_trips

from fanlora import methods
from fanlora.backbone import load_backbone
from fanlora.cli import main
from fanlora.config import TrainParams
from fanlora.methods import ssp


def test_the_shifted_sigmoid_holds_the_expected_parameters_at_the_budget():
    sizes = [100, 300, 50, 50, 500]
    gates = ssp.Gates(sizes, budget=400, alpha_scale=1.0)
    with torch.no_grad():
        gates.theta.copy_(torch.tensor([2.0, -1.0, 0.5, 0.0, -3.0]))
    for tau in (1.0, 0.3, 0.1):
        gates.tau = tau
        p = gates.probs()
        assert abs(float((p.detach() * gates.sizes).sum()) - 400) < 0.5
    assert p.argmax() == 0 and p.argmin() == 4  # the order of the logits survives the shift


def test_choose_keeps_the_best_logits_that_fit():
    cands = [
        ssp.Candidate("Q", 0, "lora", 100),
        ssp.Candidate("V", 0, "lora", 300),
        ssp.Candidate("O", 0, "adapter", 50),
    ]
    chosen = ssp.choose(cands, [3.0, 2.0, 1.0], budget=160)
    assert chosen == [cands[0], cands[2]]  # V does not fit after Q; O does
    assert sum(c.params for c in chosen) <= 160


@pytest.mark.e2e
def test_search_trains_the_gates_then_the_retrained_structure_starts_as_the_backbone(tiny_llama, tmp_path):
    from fanlora.train import train_adapter

    bb = load_backbone(str(tiny_llama))
    with torch.no_grad():
        before = bb.model(input_ids=IDS).logits
    cands = ssp.candidates(bb, 4, 8)
    assert {c.family for c in cands} == {"lora", "adapter"} and len(cands) == bb.layout.num_layers * 9
    budget = sum(c.params for c in cands) // 4
    opts = {**methods.get("ssp").defaults, "r": 4, "alpha": 8, "size": 8, "budget": budget}
    params = TrainParams(learning_rate=1e-2, max_steps=6, batch_size=4, eval_steps=3, logging_steps=1)
    chosen, minutes = ssp.search(bb, opts, examples(), examples(4), params, tmp_path / "search", 0, train_adapter)
    record = json.loads((tmp_path / "search" / "structure.json").read_text())
    assert record["minutes"] == minutes and record["params"] == sum(c.params for c in chosen)
    assert len(set(record["logits"].values())) > 1, "the gate logits never moved"
    assert 0 < record["params"] <= budget and sum(c.params for c in chosen) == record["params"]
    with torch.no_grad():  # the search trained a copy: the backbone is untouched
        assert torch.equal(bb.model(input_ids=IDS).logits, before)
    again, _ = ssp.search(bb, opts, [], [], params, tmp_path / "search", 0, train_adapter)
    assert again == chosen  # a finished search is not run again

    model = ssp.retrain_model(bb, chosen, opts)
    assert methods.get("ssp").trainable(model) == sum(c.params for c in chosen)
    assert all(("lora_" in n or ".down." in n or ".up." in n) for n, p in model.named_parameters() if p.requires_grad)
    retrains_from_the_backbone_and_round_trips(ssp, model, before, params, tmp_path, tiny_llama)


@pytest.mark.e2e
def test_ssp_runs_in_a_grid_at_fanloras_budget(tmp_path, recipe_file):
    extra = {"methods": ["fanlora", "ssp"], "seeds": [0], "budget": {"k_max": 2, "r": 4}}
    path = grid_config(tmp_path, recipe_file, **extra)
    assert main(["experiment", str(path)]) == 0
    cells = {c["method"]: c for c in json.loads((tmp_path / "report" / "cells.json").read_text())}
    fan, found = cells["fanlora"], cells["ssp"]
    assert found["options"]["budget"] > 0 and found["trainable_parameters"] <= found["options"]["budget"]
    searched = json.loads((tmp_path / "grid" / "cells" / found["id"] / "search" / "structure.json").read_text())
    assert found["structure"] == searched["chosen"] and found["structure"]
    assert found["search_minutes"] == round(searched["minutes"], 2)
    assert (tmp_path / "grid" / "cells" / found["id"] / "adapter" / ssp.WEIGHTS).is_file()
    assert fan["trainable_parameters"] > 0
