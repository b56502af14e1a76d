"""Scoring by log-likelihood (lm-eval's way and the clean format) and stage d's training pairs."""

from __future__ import annotations

import math

import pytest
import torch

from fanlora.backbone import load_backbone
from fanlora.errors import UserError
from fanlora.evaluation.evaluate import encode_pair, evaluate_mc, training_examples
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
    from fanlora.evaluation.evaluate import choice_logliks, next_token_logprobs, single_token_choices

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


def test_gold_losses_are_read_from_the_choices_scores_when_they_hold_them(tiny_llama):
    """BoolQ's gold loss in the same pass as its accuracy: equal to the separate loss pass, or not taken."""
    from fanlora.evaluation.evaluate import gold_losses, gold_losses_from_choices

    b = load_backbone(str(tiny_llama))
    tok = b.tokenizer
    for name in ("boolq", "copa"):  # one-token choices (fast path) and multi-token ones
        task = get_task(name)
        examples = task.examples("dev", limit=4)
        preds = evaluate_mc(b.model, tok, examples, batch_size=3, progress=False).predictions
        reused = gold_losses_from_choices(tok, task, examples, preds, None)
        separate = gold_losses(b.model, tok, task, examples, batch_size=2, progress=False)
        assert reused is not None and [n for _, n in reused] == [n for _, n in separate]
        assert [v for v, _ in reused] == pytest.approx([v for v, _ in separate], abs=1e-4)
    assert gold_losses_from_choices(tok, task, examples, preds[:-1], None) is None  # an item not scored
    assert gold_losses_from_choices(tok, task, examples, preds, 4) is None  # the loss pass would cut the context
    flipped = [dict(p, label=1 - p["label"]) for p in preds]
    assert gold_losses_from_choices(tok, task, examples, flipped, None) is None


def test_mc_accuracy_and_gold_loss_take_one_pass_in_the_clean_format(tiny_llama, tmp_path, monkeypatch):
    import json

    import fanlora.stages.evaluate as adapt
    from fanlora.cli import main

    calls, real = [], adapt.gold_losses
    monkeypatch.setattr(adapt, "gold_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = ["evaluate", "--task", "boolq", "--base", "--backbone", str(tiny_llama), "--limit", "4", "--split", "dev"]
    argv += ["--set", "evaluate.gold_loss=true", "--set", "evaluate.loss_limit=4"]
    assert main([*argv, "--out", str(tmp_path / "clean")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "clean" / "items.jsonl").read_text().splitlines()]
    assert not calls and len(rows) == 4 and all("value" in r and r["gold_nll"] > 0 for r in rows)
    titles = {e.id: e.context.partition(" -- ")[0] for e in get_task("boolq").examples("dev", 4)}
    assert {r["id"]: r["cluster"] for r in rows} == titles  # the passage each question shares
    assert main([*argv, "--mc-format", "lm-eval", "--out", str(tmp_path / "lm")]) == 0  # " yes" ≠ "yes" scored
    assert calls == [1]
