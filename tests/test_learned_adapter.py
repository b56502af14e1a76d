"""Learned-Adapter: the architecture logits train, derivation keeps what beats ``zero`` within the budget, the
retrained model starts as the backbone, saves and loads (also through the evaluator's loader), and it runs
as a grid method at FanLoRA's budget."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import IDS, examples, grid_config, retrains_from_the_backbone_and_round_trips

from fanlora import methods
from fanlora.backbone import load_backbone
from fanlora.cli import main
from fanlora.config import TrainParams
from fanlora.errors import UserError
from fanlora.methods import learned_adapter as la


def _weights(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows)


def test_derive_keeps_edges_whose_best_activation_beats_zero_within_the_budget():
    found = [la.Edge("attn", 0), la.Edge("ffn", 0), la.Edge("block", 0)]
    # operations: zero, relu, gelu, silu, tanh, identity
    w = _weights([
        [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],  # zero wins: dropped
        [0.10, 0.10, 0.50, 0.10, 0.10, 0.10],  # gelu by 0.40
        [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],  # identity, set to 0.45 below: a margin of 0.35
    ])  # fmt: skip
    w[2, 5] = 0.45
    kept, table = la.derive(found, w, params_per_cell=10, budget=None)
    assert [e.label for e in kept] == ["ffn.0:gelu", "block.0:identity"]
    assert set(table) == {"attn.0", "ffn.0", "block.0"}
    kept, _ = la.derive(found, w, params_per_cell=10, budget=15)  # room for one: the strongest
    assert [e.label for e in kept] == ["ffn.0:gelu"]
    none_win = _weights([[0.9, 0.02, 0.02, 0.02, 0.02, 0.02]] * 3)
    kept, _ = la.derive(found, none_win, params_per_cell=10, budget=None)
    assert len(kept) == 1  # never an empty architecture


@pytest.mark.e2e
def test_search_moves_the_architecture_then_the_retrained_model_starts_as_the_backbone(tiny_llama, tmp_path):
    from fanlora.train import train_adapter

    bb = load_backbone(str(tiny_llama))
    with torch.no_grad():
        before = bb.model(input_ids=IDS).logits
    width = bb.model.config.hidden_size
    per_cell = la.cell_params(width, 8)
    budget = 4 * per_cell
    opts = {**methods.get("learned-adapter").defaults, "size": 8, "budget": budget, "arch_lr": 0.2, "arch_batch": 2}
    params = TrainParams(learning_rate=1e-2, max_steps=6, batch_size=4, eval_steps=3, logging_steps=1)
    chosen, minutes = la.search(bb, opts, examples(), examples(4), params, tmp_path / "search", 0, train_adapter)
    record = json.loads((tmp_path / "search" / "structure.json").read_text())
    assert len(record["weights"]) == bb.layout.num_layers * len(la.PLACES)
    uniform = 1 / (1 + len(la.ACTIVATIONS))
    assert any(abs(v - uniform) > 1e-3 for row in record["weights"].values() for v in row), "logits never moved"
    assert 1 <= len(chosen) <= 4 and record["params"] == per_cell * len(chosen) <= budget
    assert all(e.act in la.ACTIVATIONS for e in chosen) and minutes == record["minutes"]
    with torch.no_grad():  # the search trained a copy
        assert torch.equal(bb.model(input_ids=IDS).logits, before)
    again, _ = la.search(bb, opts, [], [], params, tmp_path / "search", 0, train_adapter)
    assert again == chosen  # a finished search is not run again

    model = la.retrain_model(bb, chosen, opts)
    assert methods.get("learned-adapter").trainable(model) == per_cell * len(chosen)
    with pytest.raises(UserError, match="already carries"):
        la.attach(model, bb.layout, chosen, 8)
    retrains_from_the_backbone_and_round_trips(la, model, before, params, tmp_path, tiny_llama)


def test_a_budget_that_is_not_a_count_is_refused(tiny_llama):
    bb = load_backbone(str(tiny_llama))
    with pytest.raises(UserError, match="learned-adapter needs a parameter budget"):
        methods.build("learned-adapter", bb, {"budget": "1M"})
    assert methods.build("learned-adapter", bb).search is not None  # no budget: the DARTS rule alone


@pytest.mark.e2e
def test_learned_adapter_runs_in_a_grid_at_fanloras_budget(tmp_path, recipe_file):
    extra = {"methods": ["fanlora", "learned-adapter"], "seeds": [0], "budget": {"k_max": 2, "r": 4}}
    path = grid_config(tmp_path, recipe_file, **extra)
    assert main(["experiment", str(path)]) == 0
    cells = {c["method"]: c for c in json.loads((tmp_path / "report" / "cells.json").read_text())}
    found = cells["learned-adapter"]
    kept, spent = found["structure"], found["trainable_parameters"]
    searched = json.loads((tmp_path / "grid" / "cells" / found["id"] / "search" / "structure.json").read_text())
    assert kept and all(":" in s for s in kept) and found["search_minutes"] == round(searched["minutes"], 2)
    assert spent > 0 and spent % len(kept) == 0  # whole cells
    assert len(kept) == 1 or spent <= found["options"]["budget"]
    assert (tmp_path / "grid" / "cells" / found["id"] / "adapter" / la.WEIGHTS).is_file()
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    shown = {s["method"]: s for s in results["structures"]}
    assert set(shown) == {"fanlora", "learned-adapter"}
    assert shown["learned-adapter"]["elements"] == len(kept) and sum(
        shown["learned-adapter"]["counts"].values()
    ) == len(kept)
    assert all(what.startswith("LoRA ") for what in shown["fanlora"]["counts"])
    assert "- learned-adapter/default:" in (tmp_path / "report" / "results.md").read_text()
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["learned-adapter"]["search_minutes_median"] == found["search_minutes"]  # one seed: its own value
    assert rows["fanlora"]["search_minutes_median"] is None
