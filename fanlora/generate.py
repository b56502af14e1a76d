"""Batched decoding (greedy, sampling, beam search) on top of ``transformers``' ``generate``.

HF already does the decoding itself (KV cache, beam bookkeeping, stop strings); what it lacks for evaluation is
the batching around it: prompts sorted by length so that padding stays small, left padding, a progress bar,
and outputs cut at the task's stop strings and returned in the input order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from fanlora.config import DECODINGS as STRATEGIES
from fanlora.config import EvaluateConfig as _Defaults
from fanlora.errors import UserError


@dataclass
class Decoding:
    """How to decode; the defaults are the recipe's (``evaluate.*`` in :mod:`fanlora.config`)."""

    strategy: str = _Defaults.decoding
    num_beams: int = _Defaults.num_beams  # beam search only (the paper's default beam)
    temperature: float = _Defaults.temperature  # sampling only
    top_p: float = _Defaults.top_p  # sampling only
    max_new_tokens: int | None = None  # None: the task's default
    seed: int = _Defaults.seed  # sampling only: the same seed and batch size give the same text

    def check(self) -> Decoding:
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown decoding {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.strategy == "beam" and self.num_beams < 2:
            raise UserError(f"beam search needs --num-beams ≥ 2, got {self.num_beams}")
        if self.strategy == "sampling" and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise UserError("sampling needs --temperature > 0 and 0 < --top-p ≤ 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be ≥ 1, got {self.max_new_tokens}")
        return self

    def generate_kwargs(self) -> dict[str, Any]:
        if self.strategy == "greedy":
            return {"do_sample": False, "num_beams": 1}
        if self.strategy == "beam":
            return {"do_sample": False, "num_beams": self.num_beams, "early_stopping": True}
        return {"do_sample": True, "num_beams": 1, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, with BOS only when the tokenizer adds one (as :func:`evaluate.encode_pair`)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def cut(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the first stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | list[int]],
    decoding: Decoding,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "generating",
    on_batch: Callable[[list[int]], None] | None = None,
) -> list[str]:
    """Continue each prompt; returns the generated text (without the prompt), cut at the first stop string.

    Prompts longer than ``max_length - max_new_tokens`` tokens are cut from the left (the question usually
    sits at the end of a prompt). ``on_batch`` is told the input indices of each batch before it runs (the
    serving engine routes each row to its adapter with it).
    """
    decoding.check()
    device = next(model.parameters()).device
    encoded = [p if isinstance(p, list) else prompt_ids(tokenizer, p) for p in prompts]
    if max_length:
        keep = max_length - max_new_tokens
        if keep < 1:
            raise UserError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in {max_length} tokens")
        encoded = [ids[-keep:] for ids in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = [""] * len(encoded)
    kwargs = decoding.generate_kwargs()
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    if decoding.strategy == "sampling":
        torch.manual_seed(decoding.seed)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="ex")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if on_batch is not None:
            on_batch(idx)
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every row's last prompt token sits in the last column
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i])
            mask[row, width - n :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for row, i in enumerate(idx):
            out[i] = cut(texts[row], stop)
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return out
