"""Log-probabilities as OpenAI's responses carry them: per generated token, and per prompt token with ``echo``.

Which distribution, said once (docs/serving.md repeats it): a **generated** token's logprob and its alternatives
come from the scores it was actually drawn from — after the request's penalties, temperature, top-k, top-p and
min-p (a token those removed shows as ``FLOOR``); a greedy request's are the model's own (with its penalties).
A **prompt** token's (``echo``) are the model's own distribution at temperature 1 on the request's adapter —
what lm-evaluation-harness sums into a log-likelihood. The prompt's are computed by one forward over the whole
prompt on the engine's thread between two steps (:func:`prompt_entries`); a request that does not ask costs
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FLOOR = -9999.0  # as vLLM: JSON has no -inf, so a token the filters removed is sent with this logprob


@dataclass(frozen=True)
class Entry:
    """One position: the token there, its logprob (None: a prompt's first token, which nothing precedes) and the
    ``k`` most likely tokens (id, logprob), best first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


def _finite(value: float) -> float:
    return value if value > FLOOR else FLOOR


def _entries(logprobs: torch.Tensor, tokens: list[int], k: int) -> list[Entry]:
    """Entries for rows of log-probabilities [n, vocab] whose chosen tokens are ``tokens``."""
    chosen = logprobs.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return [
        Entry(t, _finite(c), tuple((int(i), _finite(float(v))) for i, v in zip(row_ids, row_values, strict=True)))
        for t, c, row_ids, row_values in zip(tokens, chosen, ids.tolist(), values.tolist(), strict=True)
    ]


def entry(scores: torch.Tensor, token: int, k: int) -> Entry:
    """The entry of ``token`` drawn from ``scores`` [vocab] (logits after the request's processors)."""
    return _entries(torch.log_softmax(scores.float(), dim=-1)[None], [token], k)[0]


@torch.no_grad()
def prompt_entries(engine: Any, ids: list[int], slot: int, k: int) -> list[Entry]:
    """The entry of every prompt token (the first has no logprob: nothing precedes it), on ``slot``'s adapter.
    Runs the model: call it on the engine's thread (``Scheduler.on_engine``)."""
    engine.use_slots([slot])
    device = next(engine.model.parameters()).device
    x = torch.tensor([ids], device=device)
    logits = engine.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, :-1]
    return [Entry(ids[0], None, ()), *_entries(torch.log_softmax(logits.float().cpu(), dim=-1), ids[1:], k)]


def token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(entries: list[Entry], tokenizer: Any) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``content`` holds each token with its bytes and its top alternatives."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]}


def completion_logprobs(entries: list[Entry], tokenizer: Any, offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions ``logprobs``: parallel lists; each ``top_logprobs`` dict holds the k most likely
    tokens and the chosen one (as vLLM: lm-eval reads "greedy" off it); a prompt's first token has nulls."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text = token_text(tokenizer, e.token)
        out["text_offset"].append(offset)
        offset += len(text)
        out["tokens"].append(text)
        if e.logprob is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {token_text(tokenizer, t): lp for t, lp in e.top}
        top.setdefault(text, e.logprob)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(top)
    return out
