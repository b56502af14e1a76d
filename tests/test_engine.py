"""The multi-tenant engine equals PEFT's unmerged outputs, per adapter, in single and mixed batches."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_adapter, setting_for
from peft import PeftModel

from fanlora.backbone import load_backbone
from fanlora.errors import UserError
from fanlora.generate import Decoding
from fanlora.serving import multilora
from fanlora.serving.engine import Engine

PROMPTS = ["The capital of France is", "One, two, three,", "Hello there, my friend", "A"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("engine")
    backbone = load_backbone(str(tiny_llama))
    setting = setting_for(backbone)
    adapters = {
        "a": make_adapter(root / "a", tiny_llama, setting, 4, 8, 1),
        "b": make_adapter(root / "b", tiny_llama, setting, 8, 8, 2, use_rslora=True),
        "c": make_adapter(root / "c", tiny_llama, setting, 2, 16, 3),
    }
    engine = Engine.from_backbone(backbone, setting)
    for name, path in adapters.items():
        engine.load(name, path)
    return engine, adapters, setting, tiny_llama


def peft_logits(tiny_llama, path, batch):
    model = PeftModel.from_pretrained(load_backbone(str(tiny_llama)).model, str(path)).eval()
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def batch_of(tok, prompts):
    tok.padding_side = "right"
    return dict(tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False))


@pytest.mark.parametrize("run_tokens", [0, 10**9], ids=["runs", "stacked"])
def test_single_and_mixed_batches_equal_peft(world, run_tokens, monkeypatch):
    monkeypatch.setattr(multilora, "MIN_RUN_TOKENS", run_tokens)  # both mixed paths: one update per run, or stacked
    engine, adapters, _, tiny_llama = world
    batch = batch_of(engine.tokenizer, PROMPTS)
    want = {n: peft_logits(tiny_llama, p, batch) for n, p in adapters.items()}
    base = load_backbone(str(tiny_llama)).model
    with torch.no_grad():
        want[None] = base(**batch, use_cache=False).logits
    mask = batch["attention_mask"].bool()
    for name in ("a", "b", "c", None):  # every row on one adapter
        got = engine.logits(batch["input_ids"], batch["attention_mask"], [name] * len(PROMPTS))
        assert (got - want[name])[mask].abs().max() < 1e-4
        if name is not None:
            assert (want[name] - want[None])[mask].abs().max() > 1e-2  # the adapter does change the output
    for mixed in (["a", "b", None, "c"], ["c", "a", "c", None], ["b", "b", "a", "a"]):  # all slots, or some
        got = engine.logits(batch["input_ids"], batch["attention_mask"], mixed)
        for row, name in enumerate(mixed):
            assert (got[row] - want[name][row])[mask[row]].abs().max() < 1e-4


def test_a_mixed_batch_is_routed_as_runs_of_one_adapter_and_as_a_mask_over_the_present_ones(world):
    engine = world[0]
    a, b = engine.table.slot_of("a"), engine.table.slot_of("b")
    engine.use_slots([a, a, b, b, 0, a])
    assert engine.rows.spans == [(a, 0, 2), (b, 2, 4), (a, 5, 6)]
    rank = engine.rank
    want = torch.ones(6, 2 * rank, dtype=torch.bool)  # columns: a's, then b's (c is absent: not stacked)
    for row, col in ((0, 0), (1, 0), (2, 1), (3, 1), (5, 0)):
        want[row, col * rank : (col + 1) * rank] = False
    assert torch.equal(engine.rows.mask, want)
    assert engine.rows.cols.tolist() == [(s - 1) * rank + k for s in (a, b) for k in range(rank)]


def test_mixed_generation_equals_each_adapter_alone(world):
    engine, _, _, _ = world
    names = ["a", "b", "c", None]
    for decoding in (Decoding("greedy"), Decoding("beam", num_beams=3)):
        together = engine.generate(PROMPTS, names, decoding, 5, batch_size=4)
        alone = [engine.generate([p], [n], decoding, 5)[0] for p, n in zip(PROMPTS, names, strict=True)]
        assert together == alone
        assert len(set(together)) > 1


def test_load_unload_and_refusals(world, tmp_path, tiny_llama, tiny_llama_other):
    engine, adapters, setting, _ = world
    engine.load("tmp", adapters["a"])
    assert "tmp" in engine.adapters
    engine.unload("tmp")
    assert "tmp" not in engine.adapters
    with pytest.raises(UserError, match="unknown adapter 'zzz': loaded are a, b, c"):
        engine.use(["zzz"])
    other = setting_for(load_backbone(str(tiny_llama)), kinds=("Q", "D"))
    wrong = make_adapter(tmp_path / "wrong", tiny_llama, other, 4, 8, 5)
    with pytest.raises(UserError, match="outside this engine's setting"):
        engine.load("wrong", wrong)
    foreign = make_adapter(tmp_path / "foreign", tiny_llama, setting, 4, 8, 6)
    data = json.loads((foreign / "setting.json").read_text())
    data["backbone"]["weights_digest"] = "0" * 16
    (foreign / "setting.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="another backbone"):
        engine.load("foreign", foreign)
    dora = make_adapter(tmp_path / "dora", tiny_llama, setting, 4, 8, 7, use_dora=True)
    with pytest.raises(UserError, match="use_dora"):
        engine.load("dora", dora)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="not a PEFT adapter"):
        engine.load("nothing", tmp_path / "nothing")
    assert engine.adapters == ["a", "b", "c"]
