"""Validation batches, and S measured the plain way (whole passes with PEFT's own gates).

The plain :func:`performance` is the reference every fast engine is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fanlora.data.collate import pad_batch
from fanlora.data.instruct import IGNORE, Example
from fanlora.gates import GatedLoRA
from fanlora.scoring.replay import Batch


def make_batches(
    examples: Sequence[Example], pad_id: int, batch_size: int, device: torch.device | str = "cpu"
) -> list[Batch]:
    """Length-sorted padded batches (less padding, same token set), on ``device``."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    out = []
    for i in range(0, len(ordered), batch_size):
        b = pad_batch(ordered[i : i + batch_size], pad_id)
        out.append(Batch(b["input_ids"].to(device), b["attention_mask"].to(device), b["labels"].to(device)))
    return out


@torch.no_grad()
def response_nll(lm: torch.nn.Module, batches: Sequence[Batch]) -> tuple[float, int]:
    """Summed next-token NLL over response positions and their count (logits only at those positions)."""
    decoder = lm.get_decoder()
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    total, count = 0.0, 0
    for b in batches:
        hidden = decoder(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state[:, :-1]
        target = b.labels[:, 1:]
        where = target != IGNORE
        logits = head(hidden[where]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total += F.cross_entropy(logits, target[where], reduction="sum").item()
        count += int(where.sum())
    return total, count


def performance(gated: GatedLoRA, batches: Sequence[Batch]) -> float:
    """S = −(mean response-token loss) under the current PEFT gates, one whole pass per batch."""
    total, count = response_nll(gated.model.get_base_model(), batches)
    return -total / count
