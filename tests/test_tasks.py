from __future__ import annotations

import json

import pytest

from fanlora.backbone import load_backbone
from fanlora.errors import UserError
from fanlora.evaluation.evaluate import evaluate_mc
from fanlora.tasks import get_task


def test_copa_prompt_and_splits():
    copa = get_task("copa")
    assert [len(copa.examples(s)) for s in ("train", "dev", "test")] == [400, 50, 50]
    first = copa.examples("dev")[0]
    assert first.context == "The man turned on the faucet therefore"
    assert first.choices == [" the toilet filled with water.", " water flowed from the spout."]
    assert first.label == 1
    dev_ids = {e.id for e in copa.examples("dev")}
    assert not dev_ids & {e.id for e in copa.examples("test")}


def test_boolq_prompt_and_splits():
    boolq = get_task("boolq")
    assert [len(boolq.examples(s)) for s in ("train", "dev", "test")] == [32, 1635, 1635]
    ex = boolq.examples("dev", limit=1)[0]
    assert ex.context.endswith("?\nAnswer:") and "\nQuestion: " in ex.context
    assert ex.choices == [" no", " yes"]


def test_unknown_task_and_split():
    with pytest.raises(UserError, match="known tasks are boolq, copa, gsm8k, mmlu, mtbench, sql, squad"):
        get_task("squad2")
    with pytest.raises(UserError, match="no split 'validation'"):
        get_task("copa").examples("validation")


def test_mmlu_prompt_splits_and_per_subject_accuracy(tiny_llama):
    mmlu = get_task("mmlu")
    train, dev, test = (mmlu.examples(s) for s in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (285, 1405, 12637)
    assert len({e.group for e in dev}) == 57 and len({e.group for e in test}) == 57
    assert not {e.id for e in dev} & {e.id for e in test}
    ex = test[0]
    assert ex.context.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert ex.context.endswith("\nC. 24\nD. 120\nAnswer:") and ex.label == 2 and ex.choices == [" A", " B", " C", " D"]
    b = load_backbone(str(tiny_llama))
    picked = [e for e in dev if e.group == "anatomy"][:3] + [e for e in dev if e.group == "astronomy"][:2]
    result = evaluate_mc(b.model, b.tokenizer, picked, 8, progress=False)
    by = result.metrics["acc_by_group"]
    right = [p["pred"] == e.label for p, e in zip(result.predictions, picked, strict=True)]
    assert by == {"anatomy": sum(right[:3]) / 3, "astronomy": sum(right[3:]) / 2}
    assert result.metrics["acc_macro"] == pytest.approx((by["anatomy"] + by["astronomy"]) / 2)


def test_generation_task_splits_are_disjoint():
    squad = get_task("squad")
    train, dev, test = (squad.examples(s) for s in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (2609, 2015, 5946)
    titles = [{e.prompt.split("\n", 1)[0] for e in part} for part in (train, dev, test)]
    assert not titles[0] & titles[1] and not titles[0] & titles[2] and not titles[1] & titles[2]
    assert test[0].prompt.endswith("\n\nAnswer:") and test[0].target == " " + test[0].references[0]
    gsm = get_task("gsm8k")
    g_train, g_dev, g_test = (gsm.examples(s) for s in ("train", "dev", "test"))
    assert (len(g_train), len(g_dev), len(g_test)) == (6973, 500, 1319)
    assert not {e.prompt for e in g_train} & {e.prompt for e in g_dev}
    assert g_test[0].target.split("####")[-1].strip() == "18"
    sql = get_task("sql")
    s_parts = [sql.examples(s) for s in ("train", "dev", "test")]
    assert sum(len(p) for p in s_parts) >= 3000 and min(len(p) for p in s_parts) > 300
    gold = [{e.references[0] for e in p} for p in s_parts]
    assert not gold[0] & gold[2] and not gold[0] & gold[1]  # the same query never crosses splits
    mt = get_task("mtbench").examples("test")
    assert len(mt) == 80 and all(len(e.meta["turns"]) == 2 for e in mt)
    assert sum(bool(e.references) for e in mt) == 30


def test_malformed_rows_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "t", "context": "c", "question": "q", "answers": [{"text": "a"}]}\n{"title": "t"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: field 'answers' missing"):
        get_task("squad", {"test": str(bad)}).examples("test")
    bad.write_text('{"question": "q", "answer": "#### 4"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        get_task("gsm8k", {"test": str(bad)}).examples("test")
    bad.write_text('{"question": "q", "answer": "no number here"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: 'answer' has no final number"):
        get_task("gsm8k", {"train": str(bad)}).examples("train")
    with pytest.raises(UserError, match="no split 'validation' to replace"):
        get_task("copa", {"validation": str(bad)})


def test_data_override_replaces_a_split_whole(tmp_path):
    rows = get_task("copa").examples("train", limit=3)
    own = tmp_path / "copa_test.jsonl"
    rows_out = [
        {"premise": f"P{i}.", "choice1": "A", "choice2": "B", "question": "cause", "label": i % 2} for i in range(5)
    ]
    own.write_text("\n".join(json.dumps(r) for r in rows_out))
    copa = get_task("copa", {"test": str(own)})
    test = copa.examples("test")
    assert len(test) == 5 and test[1].context == "P1 because" and test[1].label == 1
    assert [e.id for e in copa.examples("train", limit=3)] == [e.id for e in rows]  # other splits untouched


def test_every_task_names_the_clusters_its_items_share():
    """What a paired comparison resamples: SQL's question intents, BoolQ's passages, MMLU's subjects,
    SQuAD's articles; COPA and GSM8K items stand alone."""
    sql = get_task("sql")
    clusters = sql.clusters("test")
    assert len(clusters) == 402 and len(set(clusters.values())) == 22
    from fanlora.sqlgen.questions import TEMPLATES

    assert set(clusters.values()) <= set(TEMPLATES)
    boolq = get_task("boolq").examples("test")
    keys = get_task("boolq").clusters("test")
    assert keys[boolq[0].id] == boolq[0].context.split(" -- ")[0] and len(set(keys.values())) < len(keys)
    mmlu = get_task("mmlu").clusters("test")
    assert len(set(mmlu.values())) == 57
    squad = get_task("squad").clusters("test")
    assert 1 < len(set(squad.values())) < len(squad) / 10
    for name in ("copa", "gsm8k"):
        keys = get_task(name).clusters("test")
        assert all(k == v for k, v in keys.items())
    lm_eval = get_task("boolq").formatted(boolq[:2], "lm-eval")
    assert [e.cluster for e in lm_eval] == [e.cluster for e in boolq[:2]]  # the format keeps the cluster


def test_sql_pairs_without_an_intent_are_their_own_clusters(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "How many customers?", "query": "SELECT COUNT(*) FROM customers"}\n'
                    '{"question": "n?", "query": "SELECT 1", "intent": "t1"}\n')  # fmt: skip
    keys = get_task("sql", {"test": str(path)}).clusters("test")
    assert sorted(keys.values()) == sorted([f"{path}:1", "t1"])
