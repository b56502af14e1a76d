"""bfloat16 on CPU (the dtype GPUs serve and train in): the engine against PEFT, stage b's scores, and PEFT
training under bf16 autocast. The schedulers, the paged pool and the prefix cache run in bf16 too: their tests
(test_continuous.py, test_prefix_cache.py, test_isolation.py) are parametrized over float32 and bfloat16.

Tolerance: :data:`helpers.BF16_LOGITS` (a few bf16 ulps at the logits' scale; checked to stay well under the
adapters' effect)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import BF16_LOGITS, make_adapter, setting_for, tiny_recipe
from peft import PeftModel
from safetensors.torch import load_file

from fanlora.backbone import load_backbone
from fanlora.serving.engine import Engine

PROMPTS = ["hello there", "a b c d e f", "the sea is", "one two"]
TOLERANCE = BF16_LOGITS


@pytest.fixture(scope="module")
def bf16(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("bf16")
    setting = setting_for(load_backbone(str(tiny_llama)))
    adapters = {n: make_adapter(root / n, tiny_llama, setting, r, 8, seed) for n, r, seed in (("a", 4, 1), ("b", 8, 2))}
    engine = Engine.from_backbone(load_backbone(str(tiny_llama), dtype="bfloat16"), setting)
    for name, path in adapters.items():
        engine.load(name, path)
    tok = engine.tokenizer
    tok.padding_side = "right"
    batch = dict(tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False))
    want = {}
    with torch.no_grad():
        for name, path in [*adapters.items(), (None, None)]:
            model = load_backbone(str(tiny_llama), dtype="bfloat16").model
            model = PeftModel.from_pretrained(model, str(path)) if path else model
            want[name] = model.eval()(**batch, use_cache=False).logits
    return engine, batch, want


def test_bf16_engine_equals_peft_in_bf16_on_single_and_mixed_batches(bf16):
    engine, batch, want = bf16
    mask = batch["attention_mask"].bool()
    for names in (["a"] * 4, ["b"] * 4, [None] * 4, ["a", None, "b", "a"]):
        got = engine.logits(batch["input_ids"], batch["attention_mask"], names)
        assert got.dtype == torch.bfloat16
        for row, name in enumerate(names):
            assert (got[row] - want[name][row])[mask[row]].abs().max() < TOLERANCE, (names, row)
    effect = (want["a"] - want[None])[mask].abs().max()
    assert effect > 10 * TOLERANCE  # the tolerance could not hide an adapter


@pytest.mark.e2e
@pytest.mark.parametrize("scorer", ["ab-exact", "ab-first-order"])
def test_scoring_a_bf16_backbone_accumulates_in_fp32_and_ranks_like_fp32(searched_run, tmp_path, scorer):
    """Stage b on a bfloat16 backbone: every score finite, the losses summed in fp32 (a bf16 sum of a
    batch's NLL would round away one module's ~1e-4 effect), and the modules' order close to the fp32 one."""
    import shutil

    from scipy.stats import spearmanr

    from fanlora.config import load_config
    from fanlora.stages.score import run_score

    recipe, run = searched_run
    got = {}
    for dtype in ("float32", "bfloat16"):
        copy = shutil.copytree(run, tmp_path / dtype)
        for old in copy.glob("scores*.json"):
            old.unlink()
        cfg = load_config(str(recipe), [f"backbone.dtype={dtype}", f"score.method={scorer}"])
        table = run_score(cfg, copy, progress=False)
        got[dtype] = table.values
    keys = sorted(got["float32"])
    assert all(math.isfinite(got["bfloat16"][k]) for k in keys)
    rho = spearmanr([got["float32"][k] for k in keys], [got["bfloat16"][k] for k in keys]).statistic
    assert rho > 0.5, rho


@pytest.mark.e2e
def test_peft_training_under_bf16_autocast_keeps_fp32_weights_and_learns(tmp_path, tiny_llama, monkeypatch):
    """The GPU's training path on this CPU: bf16 autocast forced on (the hardware check says yes), a few steps
    of LoRA on the tiny model; the trainable weights stay fp32 (autocast casts the matmuls, not the master
    weights), the loss is finite and the adapter moved."""
    from fanlora import train
    from fanlora.config import load_config
    from fanlora.stages.finetune import Plan, finetune

    monkeypatch.setattr(train, "native_bf16", lambda: True)
    made = []
    arguments = train._arguments
    monkeypatch.setattr(train, "_arguments", lambda *a: made.append(arguments(*a)) or made[-1])
    cfg = load_config(tiny_recipe(tiny_llama), ["finetune.train.bf16=true", "finetune.task=copa"])
    out = tmp_path / "lora"
    finetune(cfg, Plan("lora", {}, None), out, load_backbone(str(tiny_llama)))
    assert made and made[0].bf16 is True  # the Trainer ran under bf16 autocast
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] >= 1 and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["best_dev_loss"])
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert any(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)  # B starts at zero: it learned
