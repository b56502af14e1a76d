"""Scoring by log-likelihood (lm-eval's way and the clean format) and stage d's training pairs."""

from __future__ import annotations

import math

import pytest
import torch

from fanlora.backbone import load_backbone
from fanlora.errors import UserError
from fanlora.evaluate import encode_pair, evaluate_mc, training_examples
from fanlora.tasks import MCExample, get_task


def test_mc_scoring_matches_a_hand_computed_loglik(tiny_llama):
    b = load_backbone(str(tiny_llama))
    tok = b.tokenizer
    ex = MCExample("0", "The sky is", [" blue and wide", " green"], 0)
    result = evaluate_mc(b.model, tok, [ex], batch_size=1, progress=False)
    for c, got in zip(ex.choices, result.predictions[0]["loglik"], strict=True):
        ctx = tok(ex.context, add_special_tokens=False)["input_ids"]
        cont = tok(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(b.model(input_ids=ids).logits[0].float(), -1)
        want = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert got == pytest.approx(want, abs=1e-4)
    ll = result.predictions[0]["loglik"]
    assert result.predictions[0]["pred"] == max(range(2), key=ll.__getitem__)
    norm = [v / len(c) for v, c in zip(ll, ex.choices, strict=True)]
    assert result.predictions[0]["pred_norm"] == max(range(2), key=norm.__getitem__)
    assert result.metrics["acc"] == float(result.predictions[0]["pred"] == 0)
    assert math.isfinite(ll[0])


def test_training_pairs_label_only_the_answer(tiny_llama):
    tok = load_backbone(str(tiny_llama)).tokenizer
    ex = get_task("copa").examples("train", limit=1)[0]
    pair = training_examples(tok, get_task("copa"), [ex], 64)[0]
    answer = tok.decode([t for t in pair.labels if t != -100])
    assert answer == ex.choices[ex.label]
    long = encode_pair(tok, "a b c d e f", " g", max_length=3)
    full = encode_pair(tok, "a b c d e f", " g")
    assert long.input_ids == full.input_ids[-3:] and long.labels[-1] == full.labels[-1] != -100


def test_single_token_fast_path_equals_one_pass_per_choice(tiny_llama):
    from fanlora.evaluate import choice_logliks, next_token_logprobs, single_token_choices

    b = load_backbone(str(tiny_llama))
    tok = b.tokenizer
    examples = get_task("boolq").examples("dev", limit=3) + get_task("mmlu").examples("dev", limit=3)
    single = single_token_choices(tok, examples)
    assert single is not None and [len(s) for s in single] == [2, 2, 2, 4, 4, 4]
    contexts = [encode_pair(tok, ex.context, "").input_ids for ex in examples]
    fast = next_token_logprobs(b.model, tok, contexts, single, batch_size=4, progress=False)
    pairs = [encode_pair(tok, ex.context, c) for ex in examples for c in ex.choices]
    slow = choice_logliks(b.model, tok, pairs, batch_size=5, progress=False)
    assert [v for row in fast for v in row] == pytest.approx(slow, abs=1e-4)
    assert single_token_choices(tok, get_task("copa").examples("dev", limit=2)) is None


def test_lm_eval_format_scores_what_lm_eval_scores(tiny_llama):
    """lm-eval 0.4: target_delimiter " " + doc_to_choice; acc_norm over len(doc_to_choice) alone."""
    copa, boolq = get_task("copa"), get_task("boolq")
    ex = copa.examples("test", 1)[0]
    lm = copa.formatted([ex], "lm-eval")[0]
    assert [lm.delimiter + c for c in lm.choices] == [" " + c for c in ex.choices]  # two spaces before the text
    assert lm.choices == ex.choices and copa.formatted([ex], "clean")[0].delimiter == ""
    bq = boolq.formatted(boolq.examples("test", 1), "lm-eval")[0]
    assert bq.choices == ["no", "yes"] and bq.delimiter == " "
    with pytest.raises(UserError, match="unknown multiple-choice format"):
        copa.formatted([ex], "harness")

    b = load_backbone(str(tiny_llama))
    tok = b.tokenizer
    result = evaluate_mc(b.model, tok, [lm], batch_size=1, progress=False)
    for c, got in zip(lm.choices, result.predictions[0]["loglik"], strict=True):
        pair = encode_pair(tok, lm.context, "  " + c.removeprefix(" "))
        ids = torch.tensor([pair.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(b.model(input_ids=ids).logits[0].float(), -1)
        want = sum(logp[i - 1, t].item() for i, t in enumerate(pair.labels) if t != -100)
        assert got == pytest.approx(want, abs=1e-4)
    ll = result.predictions[0]["loglik"]
    norm = [v / len(c) for v, c in zip(ll, lm.choices, strict=True)]  # the delimiter is not counted
    assert result.predictions[0]["pred_norm"] == max(range(2), key=norm.__getitem__)
