"""Each row's next token: argmax or a seeded sample after the request's own processors, one row's failure its own.

Every sampling request has its own ``torch.Generator`` seeded from its ``seed``, so a seeded request's text does
not depend on which requests share its steps. The processors are HF's own (``RepetitionPenaltyLogitsProcessor``,
``MinNewTokensLengthLogitsProcessor``, ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``,
``MinPLogitsWarper``, in HF's order) plus :class:`OutputPenalties` — OpenAI's presence and frequency penalties,
which HF lacks (its repetition penalty is multiplicative and counts the prompt). :func:`chain` builds them once
for both schedulers: the continuous one calls it per row (:func:`pick`), the batch one hands it to
``generate``. A request that asks for none of them costs nothing: its row takes the argmax of the whole batch,
or one sample, as before. A row whose logits are not finite, or whose sampling fails, gets None and is ended
alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fanlora.serving.jobs import Job, accept
from fanlora.serving.logprobs import entry


class OutputPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens after ``prompt_len`` (the output so far)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class Recorder(LogitsProcessor):
    """Last in the batch scheduler's chain: keeps the scores each token was drawn from, for its logprobs."""

    scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.scores = scores
        return scores


def chain(job: Job, prompt_len: int, eos: int | None) -> LogitsProcessorList:
    """The processors of ``job``'s request over ids whose first ``prompt_len`` are the prompt; empty when it
    asks for plain argmax or plain sampling at temperature 1."""
    e, d = job.extras, job.decoding
    out: list[LogitsProcessor] = []
    if e.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(e.repetition_penalty))
    if e.presence_penalty or e.frequency_penalty:
        out.append(OutputPenalties(prompt_len, e.presence_penalty, e.frequency_penalty))
    if e.min_tokens and eos is not None and not job.ignore_eos:
        out.append(MinNewTokensLengthLogitsProcessor(prompt_len, e.min_tokens, eos))
    if d.strategy == "sampling":
        if d.temperature != 1.0:
            out.append(TemperatureLogitsWarper(d.temperature))
        if e.top_k:
            out.append(TopKLogitsWarper(e.top_k))
        if d.top_p < 1.0:
            out.append(TopPLogitsWarper(d.top_p))
        if e.min_p:
            out.append(MinPLogitsWarper(e.min_p))
    return LogitsProcessorList(out)


def generator_for(job: Job) -> torch.Generator | None:
    if job.decoding.strategy != "sampling":
        return None
    g = torch.Generator()
    g.manual_seed(job.decoding.seed)
    return g


def _choose(logits: torch.Tensor, row: Any, eos: int | None) -> tuple[int, torch.Tensor | None]:
    """One row's token from its logits [1, vocab], and the scores it was drawn from when it wants logprobs."""
    job = row.job
    scores = logits.float()
    processors = chain(job, len(job.prompt_ids), eos)
    ids = torch.tensor([job.prompt_ids + job.tokens]) if job.extras.shapes else None  # only penalties read them
    for processor in processors:  # (LogitsProcessorList would inspect each one's signature at every call)
        scores = processor(ids, scores)
    if row.generator is None:
        return int(scores.argmax(-1)), scores
    probs = F.softmax(scores, dim=-1)
    if not torch.isfinite(probs).all() or not probs.sum() > 0:
        raise ValueError("the next-token distribution is not finite")
    return int(torch.multinomial(probs, 1, generator=row.generator)), scores


def pick(logits: torch.Tensor, rows: list[Any], eos: int | None = None) -> list[tuple[int, Any] | None]:
    """The next token of each row from its last-position logits [rows, vocab], with its logprobs entry when the
    request asked for them: argmax, or a seeded sample, after the request's processors.

    A row whose logits or sampling fail gets None and is ended alone by the caller: one request's numbers
    never fail its neighbours in the batch."""
    greedy = logits.argmax(-1).tolist()
    out: list[tuple[int, Any] | None] = []
    for i, row in enumerate(rows):
        extras = row.job.extras
        if not torch.isfinite(logits[i]).all():
            out.append(None)
        elif row.generator is None and not extras.shapes and extras.logprobs is None:
            out.append((greedy[i], None))
        else:
            try:
                token, scores = _choose(logits[i : i + 1], row, eos)
            except (ValueError, RuntimeError):
                out.append(None)
                continue
            out.append((token, None if extras.logprobs is None else entry(scores[0], token, extras.logprobs)))
    return out


ROW_FAILED = "error"  # a job's ``finished`` when its own row failed: it already got its error event


def take(job: Job, picked: tuple[int, Any] | None, tokenizer: Any) -> None:
    """Hand the picked token (and its logprobs entry) to ``job``, or end the job alone when its row failed."""
    if picked is None:
        if not job.finished and not job.cancelled:
            job.emit("error", "sampling failed for this request (its next-token scores were not finite)")
            job.finished = ROW_FAILED
        return
    token, logprobs = picked
    if logprobs is not None and not job.finished and not job.cancelled:
        job.emit("logprobs", logprobs)
    accept(job, token, tokenizer, tokenizer.eos_token_id)
