from __future__ import annotations

import json

import pytest
import torch

from fanlora.backbone import load_backbone
from fanlora.data.collate import pad_batch
from fanlora.data.instruct import Example
from fanlora.errors import UserError
from fanlora.gates import GatedLoRA
from fanlora.scoring import ScoreTable, ab_scores, make_batches, performance


@pytest.fixture
def setup(tiny_llama):
    b = load_backbone(str(tiny_llama))
    gated = GatedLoRA.create(b.model, b.layout, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for name, p in gated.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    val = []
    for n in (9, 14, 6, 11, 8):
        ids = torch.randint(3, 40000, (n,), generator=g).tolist()
        val.append(Example(ids, [-100] * 3 + ids[3:]))
    return gated, val, b.tokenizer.pad_token_id


def hf_S(gated, val, pad_id):
    """S from HF's own loss on one batch holding every example: the token-weighted mean, independently."""
    batch = pad_batch(val, pad_id)
    with torch.no_grad():
        return -gated.model(**batch).loss.item()


def test_performance_matches_hf_loss(setup):
    gated, val, pad = setup
    assert performance(gated, make_batches(val, pad, 2)) == pytest.approx(hf_S(gated, val, pad), abs=1e-5)


def test_ab_score_is_equation_3(setup, tmp_path):
    gated, val, pad = setup
    table = ab_scores(gated, val, pad, 2, tmp_path / "p.jsonl", {"x": 1}, progress=False)
    gated.set_all(True)
    s_all = hf_S(gated, val, pad)
    gated.set_all(False)
    s_null = hf_S(gated, val, pad)
    for key in [("Q", 0), ("V", 1), ("D", 1)]:
        with gated.without([key]):
            without = hf_S(gated, val, pad)
        with gated.only([key]):
            only = hf_S(gated, val, pad)
        assert table.score(*key) == pytest.approx(s_all - without + only - s_null, abs=1e-5)
    assert table.s_all == pytest.approx(s_all, abs=1e-5) and table.s_null == pytest.approx(s_null, abs=1e-5)
    assert len(table.rows()) == 14 and len({r["score"] for r in table.rows()}) > 1


def test_resume_recomputes_only_missing_entries(setup, tmp_path, monkeypatch):
    gated, val, pad = setup
    partial = tmp_path / "p.jsonl"
    full = ab_scores(gated, val, pad, 2, partial, {"x": 1}, progress=False)
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 2 + 14
    partial.write_text("\n".join(lines[:8]) + "\n" + lines[8][:10])  # 5 entries kept + a line cut by a kill
    calls = []
    import fanlora.scoring as scoring

    real = scoring.performance
    monkeypatch.setattr(scoring, "performance", lambda *a: calls.append(1) or real(*a))
    again = ab_scores(gated, val, pad, 2, partial, {"x": 1}, progress=False)
    assert len(calls) == 2 * (14 - 5)
    assert again.rows() == full.rows()


def test_foreign_or_corrupt_partial_is_refused(setup, tmp_path):
    gated, val, pad = setup
    partial = tmp_path / "p.jsonl"
    partial.write_text(json.dumps({"format": "fanlora-scores-partial/1", "x": 2}) + "\n")
    with pytest.raises(UserError, match="partial scores of another run"):
        ab_scores(gated, val, pad, 2, partial, {"x": 1}, progress=False)
    partial.write_text(json.dumps({"format": "fanlora-scores-partial/1", "x": 1}) + "\nGARBAGE\n{}\n")
    with pytest.raises(UserError, match="is corrupt"):
        ab_scores(gated, val, pad, 2, partial, {"x": 1}, progress=False)


def test_no_response_tokens_is_refused(setup, tmp_path):
    gated, _, pad = setup
    with pytest.raises(UserError, match="no response tokens"):
        ab_scores(gated, [Example([5, 6, 7], [-100] * 3)], pad, 2, tmp_path / "p.jsonl", {}, progress=False)


def test_table_round_trips(setup, tmp_path):
    gated, val, pad = setup
    table = ab_scores(gated, val, pad, 2, tmp_path / "p.jsonl", {}, progress=False)
    table.backbone = {"name": "tiny"}
    table.write(tmp_path / "s.json", tmp_path / "s.csv")
    back = ScoreTable.read(tmp_path / "s.json")
    assert back.rows() == table.rows() and back.backbone == {"name": "tiny"}
    assert (tmp_path / "s.csv").read_text().count("\n") == 15
