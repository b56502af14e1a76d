"""Instruction data for stage a: records → chat messages → token ids with loss on response tokens only.

Accepted record forms (the two users have on disk):
- alpaca: ``instruction`` (+ optional ``input``) and ``output`` or ``response``;
- chat: ``messages``, a list of ``{"role", "content"}`` with at least one assistant turn.

Prompts are rendered with the tokenizer's chat template (a plain alpaca layout when it has none). Every
assistant turn is a response; all other tokens are context and get label -100.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fanlora.data.records import read_source
from fanlora.errors import UserError

IGNORE = -100
Messages = list[dict[str, str]]


@dataclass
class Example:
    """One tokenised example: ``labels`` is ``input_ids`` with context positions set to -100."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_response(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def to_messages(record: dict[str, Any], where: str) -> Messages:
    """Normalise one record to chat messages, or say which line lacks which field."""
    if "messages" in record:
        msgs = record["messages"]
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
        if not ok:
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} strings")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: 'messages' has no assistant turn to learn from; add one or drop the line")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    response = record.get("output", record.get("response"))
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not isinstance(response, str):
        raise UserError(
            f"{where}: needs 'instruction' and 'output' (or 'response') strings, or a 'messages' list; "
            f"found fields {', '.join(sorted(record)) or 'none'}"
        )
    extra = record.get("input") or ""
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def render(tokenizer: Any, messages: Messages, generation_prompt: bool) -> str:
    """Messages as the model sees them: its chat template, or a plain alpaca layout when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    parts = []
    for m in messages:
        heads = {"user": "### Instruction:", "assistant": "### Response:", "system": "### System:"}
        head = heads.get(m["role"], m["role"])
        parts.append(f"{head}\n{m['content']}\n\n")
    if generation_prompt:
        parts.append("### Response:\n")
    return "".join(parts)


def segments(tokenizer: Any, messages: Messages) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_response) pieces.

    Each assistant turn's text is what the template adds between "prompt with generation cue" and
    "conversation through this turn"; templates that rewrite earlier turns fall back to the last turn only.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], True)
        full = render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            pieces, done = [], ""
            prompt = render(tokenizer, messages[:i], True)
            pieces.append((prompt, False))
        else:
            pieces.append((prompt[len(done) :], False))
        pieces.append((full[len(prompt) :], True))
        done = full
    return [(t, r) for t, r in pieces if t]


def tokenize_pieces(tokenizer: Any, pieces: Sequence[tuple[str, bool]], max_length: int) -> Example:
    """Token ids of the pieces, labels only on response pieces, truncated on the right."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_response in pieces:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(toks)
        labels.extend(toks if is_response else [IGNORE] * len(toks))
    return Example(ids[:max_length], labels[:max_length])


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic shuffled train/val split (the paper: 99:1); val gets at least one example.

    Both lists stay in shuffled order so that a cap on the train size still mixes every source.
    """
    if n < 2:
        raise UserError(f"the instruction corpus has {n} usable example(s): stage a needs at least 2 (train + val)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, math.ceil(n * val_fraction))
    return order[n_val:], order[:n_val]


@dataclass
class InstructionData:
    train: list[Example]
    val: list[Example]
    sources: list[str]

    def fingerprint(self, which: str = "val") -> str:
        h = hashlib.sha256()
        for ex in getattr(self, which):
            h.update(repr((ex.input_ids, ex.labels)).encode())
        return h.hexdigest()[:16]


def read_conversations(sources: Sequence[str]) -> list[Messages]:
    """Read and check every record of every source (cheap: fails on bad input before a model is loaded)."""
    if not sources:
        raise UserError("no instruction data sources given: set search.data.sources to files or bundled:<name>")
    records: list[tuple[str, dict[str, Any]]] = []
    for source in sources:
        records.extend(read_source(source))
    if not records:
        raise UserError(f"the instruction corpus {', '.join(sources)} is empty: give a file with at least 2 records")
    return [to_messages(r, where) for where, r in records]


def load_instruction_data(
    tokenizer: Any,
    sources: Sequence[str],
    max_length: int = 1024,
    val_fraction: float = 0.01,
    split_seed: int = 0,
    max_records: int | None = None,
    conversations: list[Messages] | None = None,
) -> InstructionData:
    """Split 99:1 (before any cap, so val never overlaps train), then tokenise.

    ``max_records=0`` tokenises the validation split only (what scoring needs).
    """
    if conversations is None:
        conversations = read_conversations(sources)
    train_idx, val_idx = split_indices(len(conversations), val_fraction, split_seed)
    if max_records is not None:
        train_idx = train_idx[:max_records]

    def build(indices: list[int]) -> list[Example]:
        out = []
        for i in indices:
            ex = tokenize_pieces(tokenizer, segments(tokenizer, conversations[i]), max_length)
            if ex.n_response:
                out.append(ex)
        return out

    train, val = build(train_idx), build(val_idx)
    if not val or (not train and max_records != 0):
        raise UserError(f"no example keeps a response token within max_length={max_length}: raise max_length")
    return InstructionData(train=train, val=val, sources=list(sources))


def for_search(data: Any, tokenizer: Any, conversations: list | None = None, val_only: bool = False) -> InstructionData:
    """Stage a's train/val examples as a recipe's ``search.data`` section describes them."""
    return load_instruction_data(
        tokenizer,
        data.sources,
        max_length=data.max_length,
        val_fraction=data.val_fraction,
        split_seed=data.split_seed,
        max_records=0 if val_only else data.max_train_examples,
        conversations=conversations,
    )
