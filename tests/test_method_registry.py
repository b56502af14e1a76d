"""A method is one file that registers itself: a throwaway method defined in this file alone is built, trained
in a one-cell grid, saved, recognised and loaded back by ``fanlora evaluate``'s loader, and reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from helpers import grid_config
from torch import nn

from fanlora import atomic, methods
from fanlora.backbone import Backbone, load_backbone
from fanlora.cli import main
from fanlora.errors import UserError
from fanlora.stages.evaluate import load_for_eval

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


class NormTuning(methods.Method):
    """Train only the RMSNorm weights (a real, if weak, PEFT baseline), saved as its own two files."""

    name = "norm-tuning"
    defaults: ClassVar[dict[str, Any]] = {"scale": 1.0}
    config_file = "norm_config.json"

    def build(self, backbone: Backbone, opts: dict[str, Any], ctx: methods.BuildContext) -> methods.Built:
        model = backbone.model
        for name, p in model.named_parameters():
            p.requires_grad_("norm" in name)
        return methods.Built(model, self.name, self.trainable(model), custom_save=self.save)

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return atomic.write_weights(directory, weights, "norm.safetensors", self.config_file, {"n": len(weights)})

    def load(self, backbone: Backbone, directory: Path) -> nn.Module:
        config, weights = atomic.read_weights(directory, "norm.safetensors", self.config_file, "norm-tuning")
        assert len(weights) == config["n"]
        backbone.model.load_state_dict(weights, strict=False)
        return backbone.model


@pytest.fixture
def norm_tuning():
    method = methods.register(NormTuning())
    yield method
    methods.unregister(method.name)


@pytest.mark.e2e
def test_registered_method_runs_in_a_grid_and_loads_back(tmp_path, recipe_file, tiny_llama, norm_tuning):
    assert "norm-tuning" in methods.names()
    path = grid_config(tmp_path, recipe_file, methods=["norm-tuning"], seeds=[0], set=[
        "finetune.train.max_steps=3", "finetune.train.eval_steps=1", "finetune.max_dev_examples=4",
        "finetune.train.learning_rate=0.05",
    ])  # fmt: skip
    assert main(["experiment", str(path)]) == 0
    (cell,) = json.loads((tmp_path / "report" / "cells.json").read_text())
    bb = load_backbone(str(tiny_llama))
    n_norm = sum(p.numel() for n, p in bb.model.named_parameters() if "norm" in n)
    assert cell["method"] == "norm-tuning" and cell["trainable_parameters"] == n_norm
    adapter = tmp_path / "grid" / "cells" / cell["id"] / "adapter"
    assert methods.owner(adapter) is norm_tuning
    with torch.no_grad():
        base = bb.model(input_ids=IDS).logits
        loaded = load_for_eval(None, adapter, load_backbone(str(tiny_llama)))[0](input_ids=IDS).logits
    assert not torch.allclose(loaded, base, atol=1e-5)  # the trained norms came back, not the bare backbone


def test_registry_refuses_duplicates_and_unknown_options(norm_tuning, tiny_llama):
    with pytest.raises(ValueError, match="already registered"):
        methods.register(NormTuning())
    with pytest.raises(UserError, match="unknown option 'rank' for method norm-tuning: valid are scale"):
        methods.build("norm-tuning", load_backbone(str(tiny_llama)), {"rank": 2})
    with pytest.raises(UserError, match=r"unknown method 'prefix': methods are fanlora, lora, .*norm-tuning"):
        methods.get("prefix")


def test_every_builtin_method_owns_only_what_it_saved(tmp_path, tiny_llama):
    """The loader is the registry's: each built-in method's saved folder is recognised as that method's."""
    for name in ("lora", "ia3", "houlsby"):
        built = methods.build(name, load_backbone(str(tiny_llama)), total_steps=10)
        where = tmp_path / name
        (built.custom_save or (lambda m, d: m.save_pretrained(str(d))))(built.model, where)
        assert methods.owner(where).name == name
    assert methods.owner(tmp_path) is None
    with pytest.raises(UserError, match="is not an adapter directory"):
        methods.load(load_backbone(str(tiny_llama)), tmp_path)
