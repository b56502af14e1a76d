"""Decoding and generation-task scoring: batching must not change outputs; metrics on hand-made outputs."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from fanlora.backbone import load_backbone
from fanlora.errors import UserError
from fanlora.evaluation.evaluate import evaluate_generation, match_choice, training_examples
from fanlora.generate import Decoding, cut, generate, prompt_ids
from fanlora.sqlgen import dataset_dir
from fanlora.tasks import GenExample, get_task

PROMPTS = ["The capital of France is", "One, two, three, four, five, six, seven,", "Hello"]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_backbone(str(tiny_llama))


def test_batched_greedy_and_beam_equal_one_prompt_at_a_time(tiny):
    model, tok = tiny.model, tiny.tokenizer
    for decoding in (Decoding("greedy"), Decoding("beam", num_beams=3)):
        batched = generate(model, tok, PROMPTS, decoding, 6, batch_size=3, progress=False)
        alone = [generate(model, tok, [p], decoding, 6, batch_size=1, progress=False)[0] for p in PROMPTS]
        assert batched == alone and all(batched)
    # greedy is HF's own greedy on an unpadded prompt
    ids = torch.tensor([prompt_ids(tok, PROMPTS[0])])
    want = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generate(model, tok, PROMPTS[:1], Decoding(), 6, progress=False)[0] == tok.decode(
        want[0, ids.shape[1] :], skip_special_tokens=True
    )


def test_sampling_follows_its_seed(tiny):
    model, tok = tiny.model, tiny.tokenizer
    runs = [generate(model, tok, PROMPTS, Decoding("sampling", seed=s), 8, progress=False) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_bad_decoding_options():
    with pytest.raises(UserError, match="unknown decoding 'topk'"):
        Decoding("topk").check()
    with pytest.raises(UserError, match="num-beams ≥ 2"):
        Decoding("beam", num_beams=1).check()
    with pytest.raises(UserError, match="temperature > 0"):
        Decoding("sampling", temperature=0).check()


def test_stop_strings_and_choice_matching():
    assert cut("Paris.\nQuestion: next", ["\n"]) == "Paris."
    assert cut("a####b\nc", ["\n", "####"]) == "a"
    assert cut("no stop", ["\n"]) == "no stop"
    assert match_choice(" Yes, it is.", [" no", " yes"]) == 1
    assert match_choice("no", [" no", " yes"]) == 0
    assert match_choice(" not sure", [" no", " yes"]) == -1  # "no" must be a whole word
    assert match_choice(" B", [" A", " B", " C", " D"]) == 1
    assert match_choice("", [" A", " B"]) == -1


def test_squad_and_gsm8k_scores_on_known_outputs():
    squad = get_task("squad")
    exs = [
        GenExample("1", "p", " Denver Broncos", ["Denver Broncos", "Broncos"]),
        GenExample("2", "p", " x", ["Paris"]),
    ]
    metrics, preds = squad.score(exs, [" the Broncos.", "Paris, France"])
    # 1: "the Broncos." normalises to "broncos" = gold 2 → EM 1; 2: F1 = 2·(1/2·1)/(1/2+1) = 2/3, EM 0
    assert metrics["exact_match"] == pytest.approx(50.0) and metrics["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert metrics["f1_em"] == pytest.approx((metrics["exact_match"] + metrics["f1"]) / 2)
    assert preds[1]["em"] == 0 and preds[1]["f1"] == pytest.approx(2 / 3)
    gsm = get_task("gsm8k")
    exs = [GenExample(str(i), "q", "", ["so #### 1,234"]) for i in range(3)]
    metrics, preds = gsm.score(exs, ["It costs $1,234.", "#### 1234.00", "I don't know"])
    assert metrics["acc"] == pytest.approx(2 / 3) and metrics["no_number"] == 1 and preds[0]["prediction"] == "1234"


def test_sql_scores_by_execution_and_never_writes():
    sql = get_task("sql")
    exs = sql.examples("test", limit=3)
    gold = [e.references[0] for e in exs]
    db = dataset_dir() / "insurance.sqlite"
    before = sqlite3.connect(db).execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    outputs = [
        gold[0].replace("SELECT", "select", 1),  # same rows, other text
        "DELETE FROM claims",  # a write: refused by the read-only connection
        "SELECT nonsense FROM nowhere",
    ]
    metrics, preds = sql.score(exs, outputs)
    assert [p["correct"] for p in preds] == [True, False, False]
    assert "readonly" in preds[1]["error"] or "read-only" in preds[1]["error"] or "not authorized" in preds[1]["error"]
    assert metrics["execution_accuracy"] == pytest.approx(1 / 3) and metrics["execution_errors"] == 2
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM claims").fetchone()[0] == before


def test_generation_targets_end_with_eos_and_only_they_are_learned(tiny):
    tok = tiny.tokenizer
    task = get_task("sql")
    ex = task.examples("train", limit=1)[0]
    pair = training_examples(tok, task, [ex], 512)[0]
    learned = [t for t in pair.labels if t != -100]
    assert learned[-1] == tok.eos_token_id
    assert tok.decode(learned[:-1]) == ex.target
    chat = get_task("mtbench")
    conv = chat.examples("train", limit=1)[0]
    pair = training_examples(tok, chat, [conv], 512)[0]
    assert conv.meta["messages"][-1]["content"][:40] in tok.decode([t for t in pair.labels if t != -100])


def test_mtbench_second_turn_sees_the_first_answer(tiny, monkeypatch):
    import fanlora.generate

    seen: list[list[str]] = []

    def fake(model, tokenizer, prompts, decoding, max_new_tokens, **kw):
        seen.append(list(prompts))
        return [f"answer{len(seen)}-{i}" for i in range(len(prompts))]

    monkeypatch.setattr(fanlora.generate, "generate", fake)  # mtbench imports it when it answers
    task = get_task("mtbench")
    exs = task.examples("test", limit=2)
    result = evaluate_generation(tiny.model, tiny.tokenizer, task, exs, Decoding(), 2, None, progress=False)
    assert len(seen) == 2 and "answer1-0" in seen[1][0] and exs[0].meta["turns"][1] in seen[1][0]
    assert result.predictions[0]["choices"][0]["turns"] == ["answer1-0", "answer2-0"]
    assert result.metrics["answers"] == 2 and result.metrics["judged"] is False
