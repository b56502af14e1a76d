from __future__ import annotations

import torch

from fanlora.backbone import load_backbone
from fanlora.gates import GatedLoRA


def _gated(path):
    b = load_backbone(str(path))
    ids = torch.tensor([[1, 20, 300, 4000, 50]])
    base_logits = b.model(input_ids=ids).logits.detach().clone()
    gated = GatedLoRA.create(b.model, b.layout, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for name, p in gated.model.named_parameters():
        if "lora_B" in name:  # fresh LoRA has B = 0; make every module matter
            p.data.normal_(0, 0.5)
    return gated, ids, base_logits


def _logits(gated, ids):
    with torch.no_grad():
        return gated.model(input_ids=ids).logits


def test_all_off_is_the_base_model_and_on_differs(tiny_llama):
    gated, ids, base = _gated(tiny_llama)
    assert len(gated.keys) == 14
    gated.set_all(False)
    assert torch.equal(_logits(gated, ids), base)
    gated.set_all(True)
    assert (_logits(gated, ids) - base).abs().max() > 1e-3


def test_off_gate_skips_the_lora_computation(tiny_llama):
    gated, ids, _ = _gated(tiny_llama)
    calls = []
    for key in gated.keys:
        gated._layers[key].lora_A["default"].register_forward_hook(lambda *a, k=key: calls.append(k))
    with gated.only([("V", 1)]):
        _logits(gated, ids)
    assert calls == [("V", 1)]
    calls.clear()
    with gated.without([("V", 1)]):
        _logits(gated, ids)
    assert len(calls) == 13 and ("V", 1) not in calls


def test_contexts_restore_gates_and_single_gate_matters(tiny_llama):
    gated, ids, _ = _gated(tiny_llama)
    gated.set(("Q", 0), False)
    before = {k: gated.is_on(k) for k in gated.keys}
    with gated.only([("D", 1)]):
        assert [k for k in gated.keys if gated.is_on(k)] == [("D", 1)]
    assert {k: gated.is_on(k) for k in gated.keys} == before
    gated.set_all(True)
    full = _logits(gated, ids)
    with gated.without([("D", 1)]):
        ablated = _logits(gated, ids)
    assert (full - ablated).abs().max() > 1e-4
