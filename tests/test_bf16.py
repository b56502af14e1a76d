"""The serving engine in bfloat16 on CPU (the dtype GPUs serve in): the first step of the bf16 path.

Tolerance: bf16 keeps 8 bits of mantissa, so two correct computations of the same logits that round in a
different order differ by a few units in the last place at the logits' scale; 4e-2 is ~5 ulps at |logit| ≈ 1
and stays well under the adapters' effect (checked)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_adapter, setting_for
from peft import PeftModel

from fanlora.backbone import load_backbone
from fanlora.serving.engine import Engine

PROMPTS = ["hello there", "a b c d e f", "the sea is", "one two"]
TOLERANCE = 4e-2


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
