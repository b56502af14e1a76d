"""Log-likelihood evaluation of multiple-choice tasks, and the matching stage-d training examples.

Context and continuation are tokenised separately and concatenated (as lm-evaluation-harness does), so the
tokens scored at evaluation are exactly the tokens trained on in stage d.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from fanlora.data.instruct import IGNORE, Example
from fanlora.tasks.base import MCExample


def encode_pair(tokenizer: Any, context: str, continuation: str, max_length: int | None = None) -> Example:
    """Context tokens (label -100) + continuation tokens; long contexts are cut from the left."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    bos = (
        [tokenizer.bos_token_id]
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False)
        else []
    )
    ids = bos + ctx + cont
    labels = [IGNORE] * (len(bos) + len(ctx)) + cont
    if max_length and len(ids) > max_length:
        ids, labels = ids[-max_length:], labels[-max_length:]
    return Example(ids, labels)


def training_examples(tokenizer: Any, examples: Sequence[MCExample], max_length: int) -> list[Example]:
    """Stage d trains the LM on context → correct choice, loss on the choice's tokens only."""
    return [encode_pair(tokenizer, e.context, e.choices[e.label], max_length) for e in examples]


@dataclass
class MCResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]


@torch.no_grad()
def choice_logliks(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[Example],
    batch_size: int,
    progress: bool = True,
    desc: str = "scoring choices",
) -> list[float]:
    """Summed log-probability of each pair's labelled tokens, batched by length."""
    from fanlora.data.collate import pad_batch

    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))
    out = [0.0] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
        idx = order[start : start + batch_size]
        batch = pad_batch([pairs[i] for i in idx], tokenizer.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            use_cache=False,
        ).logits[:, :-1]
        target = batch["labels"][:, 1:].to(device)
        mask = target != IGNORE
        # normalise only the scored positions (the continuation), not every position of the batch
        picked = torch.log_softmax(logits[mask].float(), dim=-1).gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)
        row = mask.nonzero()[:, 0]
        sums = torch.zeros(len(idx), device=device).index_add_(0, row, picked)
        for j, i in enumerate(idx):
            out[i] = float(sums[j])
    return out


def evaluate_mc(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[MCExample], batch_size: int = 16, progress: bool = True
) -> MCResult:
    """``acc`` (argmax log-likelihood) and ``acc_norm`` (argmax log-likelihood per character)."""
    pairs = [encode_pair(tokenizer, ex.context, c) for ex in examples for c in ex.choices]
    lls = choice_logliks(model, tokenizer, pairs, batch_size, progress)
    preds, hits, hits_norm = [], 0, 0
    pos = 0
    for ex in examples:
        ll = lls[pos : pos + len(ex.choices)]
        pos += len(ex.choices)
        norm = [v / max(1, len(c)) for v, c in zip(ll, ex.choices, strict=True)]
        pred = max(range(len(ll)), key=ll.__getitem__)
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        hits += pred == ex.label
        hits_norm += pred_norm == ex.label
        preds.append({"id": ex.id, "label": ex.label, "pred": pred, "pred_norm": pred_norm, "loglik": ll})
    n = max(1, len(examples))
    metrics: dict[str, Any] = {"acc": hits / n, "acc_norm": hits_norm / n, "n": len(examples)}
    groups: dict[str, list[bool]] = {}
    for ex, p in zip(examples, preds, strict=True):
        if ex.group:
            groups.setdefault(ex.group, []).append(p["pred"] == ex.label)
    if groups:
        metrics["acc_by_group"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
        metrics["acc_macro"] = sum(metrics["acc_by_group"].values()) / len(groups)
    return MCResult(metrics, preds)
