"""A GPT-2-style backbone — Conv1D projections whose weights are stored (in, out), Q/K/V packed in one
``c_attn`` — goes through every stage and the serving engine: search → score → select (by K_max and by a
parameter budget) → finetune → the engine's answers equal PEFT's, and every method sizes it from the layout."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
import yaml
from helpers import serve_in_thread, tiny_recipe
from tiny import make_tiny

from fanlora import methods
from fanlora.backbone import load_backbone
from fanlora.cli import main
from fanlora.generate import Decoding
from fanlora.serving.api import Limits
from fanlora.serving.server import create_app, load_engine
from fanlora.setting import Setting

MAP = "V=attn.c_attn,O=attn.c_proj,U=mlp.c_fc,D=mlp.c_proj"
IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    model = make_tiny(root / "model", "gpt2")
    recipe = tiny_recipe(model)
    recipe["backbone"]["module_map"] = MAP
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return model, path, root


def test_layout_gives_conv1d_shapes(gpt2):
    model, _, _ = gpt2
    bb = load_backbone(str(model), module_map=MAP)
    assert bb.layout.kinds == ["V", "O", "U", "D"]
    assert bb.layout.shape("V", 0) == (32, 96) and bb.layout.shape("O", 1) == (32, 32)  # c_attn packs Q, K, V
    assert bb.layout.shape("U", 0) == (32, 64) and bb.layout.shape("D", 0) == (64, 32)


@pytest.mark.e2e
def test_every_stage_and_the_engine_on_conv1d(gpt2, capsys):
    model, recipe, root = gpt2
    run = root / "run"
    assert main(["search", "--config", str(recipe), "--run-dir", str(run)]) == 0
    assert main(["score", "--run-dir", str(run)]) == 0
    assert main(["select", "--run-dir", str(run), "--no-plots"]) == 0
    setting = Setting.read(run / "setting.json")
    assert 1 <= setting.n_modules <= 4 and set(setting.kinds) == {"V", "O", "U", "D"}
    budget = root / "budget.json"
    assert main(["select", "--scores", str(run / "scores.json"), "--budget", "params=1000", "--r1", "4",
                 "--out", str(budget), "--no-plots", "--backbone", str(model)]) == 0  # fmt: skip
    spent = json.loads(budget.read_text())["source"]["budget"]["predicted_cost"]
    assert 0 < spent <= 1000
    tuned = root / "copa"
    assert main(["finetune", "--config", str(recipe), "--setting", str(run / "setting.json"), "--task", "copa",
                 "--run-dir", str(tuned)]) == 0  # fmt: skip
    adapter = tuned / "adapter"
    from peft import PeftModel

    peft = PeftModel.from_pretrained(load_backbone(str(model), module_map=MAP).model, str(adapter)).eval()
    engine = load_engine(setting, None, 64)  # as `fanlora serve --setting` loads it: no module map given
    engine.load("copa", adapter)
    served = _serve_once(engine, "copa")
    assert served == engine.generate(["Hello there"], ["copa"], Decoding(), 4)[0]
    engine.use(["copa"])
    with torch.no_grad():
        want, got = peft(input_ids=IDS).logits, engine.model(input_ids=IDS).logits
        engine.use([None])
        base = engine.model(input_ids=IDS).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-4)


def _serve_once(engine, name: str) -> str:
    """One greedy completion from the OpenAI-compatible server over loopback."""
    app = create_app(engine, None, None, Limits(max_tokens=8))
    srv, thread, port = serve_in_thread(app)
    try:
        body = json.dumps({"model": name, "prompt": "Hello there", "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["choices"][0]["text"]
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("method", ["fanlora", "lora", "ia3", "houlsby", "ssp"])
def test_methods_size_conv1d_from_the_layout(gpt2, method):
    model, _, _ = gpt2
    bb = load_backbone(str(model), module_map=MAP)
    layout = bb.layout
    setting = Setting(bb.identity, layout.layers_path, layout.num_layers, dict(layout.paths), 2, {0: ["V"], 1: ["D"]})
    options = {"ssp": {"budget": 500, "r": 2, "size": 4}, "ia3": {"kinds": ["V", "D"], "feedforward": ["D"]}}
    built = methods.build(method, bb, options.get(method), setting, total_steps=10)
    if method == "fanlora":
        assert built.trainable == methods.lora_params(bb, setting.modules, 12) == 12 * (32 + 96) + 12 * (64 + 32)
    elif method == "ssp":
        from fanlora.methods import ssp

        cands = ssp.candidates(bb, 2, 4)
        assert {c.key: c.params for c in cands}["lora:V.0"] == 2 * (32 + 96)
        assert {c.key: c.params for c in cands}["adapter:O.0"] == 2 * 4 * 32 + 4 + 32
    else:
        assert built.trainable > 0
        with torch.no_grad():
            assert built.model(input_ids=IDS).logits.shape[-1] > 0
