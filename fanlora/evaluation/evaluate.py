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

from fanlora.data.collate import pad_batch
from fanlora.data.instruct import IGNORE, Example, segments, tokenize_pieces
from fanlora.generate import Decoding, generate
from fanlora.tasks.base import GenExample, GenTask, MCExample, Task


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


def training_examples(tokenizer: Any, task: Task, examples: Sequence[Any], max_length: int) -> list[Example]:
    """Stage d's examples: prompt → target with loss on the target only (MC: the correct choice).

    Generation targets end with EOS so that a tuned model learns where its answer stops; chat tasks train on
    whole conversations through the chat template (``meta["messages"]``).
    """
    if getattr(task, "chat", False):
        return [tokenize_pieces(tokenizer, segments(tokenizer, ex.meta["messages"]), max_length) for ex in examples]
    eos = tokenizer.eos_token if task.kind == "generate" and tokenizer.eos_token else ""
    out = []
    for ex in examples:
        prompt, target = task.training_pair(ex)
        out.append(encode_pair(tokenizer, prompt, target + eos, max_length))
    return out


def gold_losses(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Any],
    batch_size: int,
    max_length: int | None = None,
    progress: bool = True,
) -> list[tuple[float, int]]:
    """Per example: the mean negative log-likelihood per token of the gold answer, and its token count.

    The gold answer is what stage d trains on (the correct choice; a generation task's target and EOS), so
    this is the held-out loss of the training objective: one forward pass per example, every example of the
    split, and a far more sensitive measure than right-or-wrong on a few hundred items.
    """
    pairs = training_examples(tokenizer, task, examples, max_length or 2048)
    sums = choice_logliks(model, tokenizer, pairs, batch_size, progress, desc=f"{task.name}: gold loss")
    counts = [sum(t != IGNORE for t in p.labels) for p in pairs]
    return [(-s / c if c else float("nan"), c) for s, c in zip(sums, counts, strict=True)]


def gold_losses_from_choices(
    tokenizer: Any, task: Task, examples: Sequence[Any], predictions: Sequence[dict[str, Any]], max_length: int | None
) -> list[tuple[float, int]] | None:
    """The gold losses a log-likelihood pass over the choices already holds, or None where it may not.

    In the clean format a multiple-choice item's scored continuation *is* its gold training target (context →
    " yes"), so −loglik[label] / tokens is its gold loss: BoolQ's 1,635-item test half is then scored in one
    pass, not two (each is ~30 min on one CPU thread). None — score the loss apart — when an item was not
    scored, its gold text differs from the scored choice, or the loss pass would cut its context.
    """
    by_id = {str(p["id"]): p for p in predictions}
    out = []
    for ex in examples:
        p = by_id.get(str(ex.id))
        prompt, target = task.training_pair(ex)
        if p is None or p["label"] != ex.label or ex.context != prompt or ex.delimiter + ex.choices[ex.label] != target:
            return None
        pair = encode_pair(tokenizer, prompt, target)
        if len(pair.input_ids) > (max_length or 2048):
            return None
        n = sum(t != IGNORE for t in pair.labels)
        out.append((-p["loglik"][ex.label] / n if n else float("nan"), n))
    return out


@dataclass
class EvalResult:
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


@torch.no_grad()
def next_token_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    contexts: Sequence[list[int]],
    candidates: Sequence[list[int]],
    batch_size: int,
    progress: bool = True,
    desc: str = "scoring choices",
) -> list[list[float]]:
    """log p(candidate token | context) for each context: one pass per context instead of one per choice.

    Equal to :func:`choice_logliks` when every choice is a single token (BoolQ's " no"/" yes", MMLU's " A"…):
    the choice's log-likelihood is then the log-probability of its one token after the context.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    out: list[list[float]] = [[] for _ in contexts]
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
        idx = order[start : start + batch_size]
        width = max(len(contexts[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every context ends in the last column
            ids[row, width - len(contexts[i]) :] = torch.tensor(contexts[i])
            mask[row, width - len(contexts[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # only the last position's logits are needed: the LM head runs once per row, not once per token
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            logits_to_keep=1,
        ).logits[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        for row, i in enumerate(idx):
            out[i] = logp[row, torch.tensor(candidates[i], device=device)].tolist()
    return out


def single_token_choices(tokenizer: Any, examples: Sequence[MCExample]) -> list[list[int]] | None:
    """Each example's choices as one token id each, or None when some choice needs more than one token."""
    cache: dict[str, list[int]] = {}
    out = []
    for ex in examples:
        ids = []
        for choice in ex.choices:
            c = ex.delimiter + choice
            if c not in cache:
                cache[c] = tokenizer(c, add_special_tokens=False)["input_ids"]
            if len(cache[c]) != 1:
                return None
            ids.append(cache[c][0])
        out.append(ids)
    return out


def evaluate_mc(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[MCExample], batch_size: int = 16, progress: bool = True
) -> EvalResult:
    """``acc`` (argmax log-likelihood) and ``acc_norm`` (argmax log-likelihood per character)."""
    single = single_token_choices(tokenizer, examples)
    if single is not None:
        contexts = [encode_pair(tokenizer, ex.context, "").input_ids for ex in examples]
        per_example = next_token_logprobs(model, tokenizer, contexts, single, batch_size, progress)
        lls = [v for row in per_example for v in row]
    else:
        pairs = [encode_pair(tokenizer, ex.context, ex.delimiter + c) for ex in examples for c in ex.choices]
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
    metrics: dict[str, Any] = {"acc": hits / n, "acc_norm": hits_norm / n, "n": len(examples), "mode": "loglik"}
    metrics.update(_by_group(examples, [p["pred"] for p in preds]))
    return EvalResult(metrics, preds)


def _by_group(examples: Sequence[MCExample], preds: Sequence[int]) -> dict[str, Any]:
    groups: dict[str, list[bool]] = {}
    for ex, p in zip(examples, preds, strict=True):
        if ex.group:
            groups.setdefault(ex.group, []).append(p == ex.label)
    if not groups:
        return {}
    by_group = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    return {"acc_by_group": by_group, "acc_macro": sum(by_group.values()) / len(by_group)}


def match_choice(text: str, choices: Sequence[str]) -> int:
    """The choice a generated answer names: the longest choice the stripped text starts with
    (case-insensitive), else -1 (counted wrong). " yes" matches "Yes, because…"; "no" does not match "not"."""
    said = text.strip().lower()
    best, best_len = -1, 0
    for i, c in enumerate(choices):
        want = c.strip().lower()
        if want and said.startswith(want) and len(want) > best_len:
            rest = said[len(want) : len(want) + 1]
            if not rest or not rest.isalnum():
                best, best_len = i, len(want)
    return best


def evaluate_mc_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[MCExample],
    decoding: Decoding,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Multiple choice by generation: the model writes its answer after the context; it must name a choice."""
    longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for ex in examples for c in ex.choices)
    texts = generate(
        model,
        tokenizer,
        [ex.context for ex in examples],
        decoding,
        decoding.max_new_tokens or longest + 2,
        stop=("\n",),
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    preds = []
    for ex, text in zip(examples, texts, strict=True):
        preds.append({"id": ex.id, "label": ex.label, "pred": match_choice(text, ex.choices), "output": text})
    n = max(1, len(examples))
    metrics: dict[str, Any] = {
        "acc": sum(p["pred"] == p["label"] for p in preds) / n,
        "unmatched": sum(p["pred"] < 0 for p in preds),
        "n": len(examples),
        "mode": "generate",
        "decoding": decoding.strategy,
    }
    metrics.update(_by_group(examples, [p["pred"] for p in preds]))
    return EvalResult(metrics, preds)


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer: Any,
    task: GenTask,
    examples: Sequence[GenExample],
    decoding: Decoding,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Generate with the task's stop strings and token budget, then score with the task's metric."""
    outputs = task.outputs(model, tokenizer, examples, decoding, batch_size, max_length, progress)
    metrics, preds = task.score(examples, outputs)
    metrics = {**metrics, "n": len(examples), "mode": "generate", "decoding": decoding.strategy}
    if decoding.strategy == "beam":
        metrics["num_beams"] = decoding.num_beams
    return EvalResult(metrics, preds)
