"""Each row's next token in the continuous scheduler: argmax or a seeded sample, one row's failure its own.

Every sampling request has its own ``torch.Generator`` seeded from its ``seed``, so a seeded request's text does
not depend on which requests share its steps; sampling uses HF's own ``TemperatureLogitsWarper`` /
``TopPLogitsWarper``. A row whose logits are not finite, or whose sampling fails, gets None and is ended alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from fanlora.serving.jobs import Job, accept


def generator_for(job: Job) -> torch.Generator | None:
    if job.decoding.strategy != "sampling":
        return None
    g = torch.Generator()
    g.manual_seed(job.decoding.seed)
    return g


def sample(logits: torch.Tensor, row: Any) -> int:
    """One seeded sample from one row's logits [1, vocab]; ValueError when they give no distribution."""
    d = row.job.decoding
    scores = TemperatureLogitsWarper(d.temperature)(None, logits.float())
    if d.top_p < 1.0:
        scores = TopPLogitsWarper(d.top_p)(None, scores)
    probs = F.softmax(scores, dim=-1)
    if not torch.isfinite(probs).all() or not probs.sum() > 0:
        raise ValueError("the next-token distribution is not finite")
    return int(torch.multinomial(probs, 1, generator=row.generator))


def pick(logits: torch.Tensor, rows: list[Any]) -> list[int | None]:
    """The next token of each row from its last-position logits [rows, vocab]: argmax, or a seeded sample.

    A row whose logits or sampling fail gets None and is ended alone by the caller: one request's numbers
    never fail its neighbours in the batch."""
    greedy = logits.argmax(-1).tolist()
    out: list[int | None] = []
    for i, row in enumerate(rows):
        if not torch.isfinite(logits[i]).all():
            out.append(None)
        elif row.generator is None:
            out.append(greedy[i])
        else:
            try:
                out.append(sample(logits[i : i + 1], row))
            except (ValueError, RuntimeError):
                out.append(None)
    return out


ROW_FAILED = "error"  # a job's ``finished`` when its own row failed: it already got its error event


def take(job: Job, token: int | None, tokenizer: object) -> None:
    """Hand ``token`` to ``job``, or end the job alone when its row failed."""
    if token is None:
        if not job.finished and not job.cancelled:
            job.emit("error", "sampling failed for this request (its next-token scores were not finite)")
            job.finished = ROW_FAILED
        return
    accept(job, token, tokenizer, tokenizer.eos_token_id)
