from __future__ import annotations

import gzip
import json

import pytest

from fanlora.backbone import load_backbone
from fanlora.data.instruct import IGNORE, load_instruction_data, segments, split_indices, to_messages, tokenize_pieces
from fanlora.data.records import iter_jsonl, read_source
from fanlora.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_backbone(str(tiny_llama)).tokenizer


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_alpaca_and_chat_forms():
    a = to_messages({"instruction": "Add", "input": "2+2", "output": "4"}, "f:1")
    assert a == [{"role": "user", "content": "Add\n\n2+2"}, {"role": "assistant", "content": "4"}]
    b = to_messages({"instruction": "Hi", "response": "Hello"}, "f:2")
    assert b[1]["content"] == "Hello"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert to_messages({"messages": msgs}, "f:3") == msgs


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"instruction": "x"}, "f:7: needs 'instruction' and 'output'"),
        ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
        ({"messages": "nope"}, "list of {role, content}"),
    ],
)
def test_bad_records_name_the_line(record, needle):
    with pytest.raises(UserError, match=needle):
        to_messages(record, "f:7")


def test_labels_cover_exactly_the_responses(tok):
    msgs = [
        {"role": "user", "content": "Say cat"},
        {"role": "assistant", "content": "cat cat"},
        {"role": "user", "content": "Say dog"},
        {"role": "assistant", "content": "dog"},
    ]
    ex = tokenize_pieces(tok, segments(tok, msgs), 512)
    response = tok.decode([t for t in ex.labels if t != IGNORE])
    assert "cat cat" in response and "dog" in response
    assert "Say" not in response and "user" not in response
    context = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE])
    assert "Say cat" in context and "Say dog" in context
    assert len(tokenize_pieces(tok, segments(tok, msgs), 10).input_ids) == 10


def test_bad_json_line_is_named(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, "{not json"])
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid JSON"):
        list(iter_jsonl(path))


def test_gz_and_bundled_sources(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    assert read_source(str(path))[0][1]["output"] == "b"
    assert len(read_source("bundled:instruct/gpteacher_roleplay")) == 1923
    with pytest.raises(UserError, match="no bundled dataset"):
        read_source("bundled:nope")


def test_split_is_deterministic_disjoint_and_99_to_1():
    train, val = split_indices(1000, 0.01, seed=0)
    assert len(val) == 10 and len(train) == 990 and not set(train) & set(val)
    assert split_indices(1000, 0.01, seed=0) == (train, val)
    assert split_indices(1000, 0.01, seed=1)[1] != val


def test_cap_keeps_val_and_empty_corpus_is_refused(tmp_path, tok):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(300)]
    path = _write(tmp_path / "d.jsonl", rows)
    full = load_instruction_data(tok, [str(path)], max_length=64)
    capped = load_instruction_data(tok, [str(path)], max_length=64, max_records=5)
    assert len(full.val) == 3 and len(capped.train) == 5
    assert full.fingerprint() == capped.fingerprint()
    val_only = load_instruction_data(tok, [str(path)], max_length=64, max_records=0)
    assert val_only.train == [] and val_only.fingerprint() == full.fingerprint()
    with pytest.raises(UserError, match="is empty"):
        load_instruction_data(tok, [str(_write(tmp_path / "e.jsonl", []))])
