"""The Table 1 methods on the one training path: parameter counts, Houlsby adapters, AdaLoRA's pruning."""

from __future__ import annotations

import pytest
import torch

from fanlora import methods
from fanlora.backbone import load_backbone
from fanlora.errors import UserError
from fanlora.methods import houlsby


def _per_layer_dims(bb):
    layer = {k: bb.model.get_submodule(bb.layout.module_name(k, 0)) for k in bb.layout.kinds}
    return layer, bb.layout.num_layers


def test_trainable_counts_follow_each_method(tiny_llama):
    bb = load_backbone(str(tiny_llama))
    layer, n = _per_layer_dims(bb)
    lora = methods.build("lora", load_backbone(str(tiny_llama)))
    assert lora.trainable == n * sum(4 * (m.in_features + m.out_features) for m in layer.values())
    ia3 = methods.build("ia3", load_backbone(str(tiny_llama)))
    assert ia3.trainable == n * (layer["K"].out_features + layer["V"].out_features + layer["D"].in_features)
    adapter = methods.build("houlsby", load_backbone(str(tiny_llama)))
    h = layer["O"].out_features
    assert adapter.trainable == n * 2 * (h * 18 + 18 + 18 * h + h)
    ada = methods.build("adalora", load_backbone(str(tiny_llama)), total_steps=20)
    assert ada.callbacks and ada.trainable > 0
    modules = [bb.layout.module_name("V", i) for i in range(n)]
    r = methods.lora_rank_for_budget(bb, modules, methods.lora_params(bb, modules, 7))
    assert r == 7


def test_unknown_method_and_option_are_refused(tiny_llama):

    with pytest.raises(UserError, match="unknown method 'prefix'"):
        methods.build("prefix", load_backbone(str(tiny_llama)))
    with pytest.raises(UserError, match="unknown option 'rank' for method lora"):
        methods.build("lora", load_backbone(str(tiny_llama)), {"rank": 2})


def test_houlsby_starts_as_identity_trains_only_itself_and_round_trips(tiny_llama, tmp_path):
    bb = load_backbone(str(tiny_llama))
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        before = bb.model(input_ids=ids).logits
    frozen = {n: p.clone() for n, p in bb.model.named_parameters()}
    built = methods.build("houlsby", bb)
    with torch.no_grad():
        assert torch.equal(bb.model(input_ids=ids).logits, before)  # up projection starts at zero
    opt = torch.optim.SGD([p for p in bb.model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = bb.model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in bb.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name.replace(".base.", ".")])
    with torch.no_grad():
        after = bb.model(input_ids=ids).logits
    assert not torch.allclose(after, before)
    houlsby.save(built.model, tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {houlsby.CONFIG, houlsby.WEIGHTS}
    from fanlora.config import load_config
    from fanlora.stages.evaluate import load_for_eval  # `fanlora evaluate --adapter DIR` loads it the same way

    loaded, _ = load_for_eval(load_config(None, [f"backbone.name={tiny_llama}"]), tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, after, atol=1e-6)


@pytest.mark.e2e
def test_adalora_reallocates_its_budget_during_training(tiny_llama, tmp_path):
    from fanlora.config import TrainParams
    from fanlora.data.instruct import Example
    from fanlora.train import train_adapter

    bb = load_backbone(str(tiny_llama))
    built = methods.build("adalora", bb, {"init_r": 4, "target_r": 1}, total_steps=12)
    ex = [Example(input_ids=[1, 5, 9, 3, 7, 2], labels=[-100, -100, 9, 3, 7, 2]) for _ in range(8)]
    params = TrainParams(learning_rate=1e-2, max_steps=12, batch_size=4, eval_steps=6, logging_steps=1)
    train_adapter(built.model, ex, ex[:4], params, tmp_path, 0, built.callbacks)
    kept = [int((p != 0).sum()) for n, p in built.model.named_parameters() if "lora_E" in n]
    assert kept and sum(kept) < 4 * len(kept), "update_and_allocate never pruned a singular value"
