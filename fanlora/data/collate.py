"""Batching for causal-LM examples with masked labels (right padding, labels -100 on padding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fanlora.data.instruct import IGNORE, Example


def pad_batch(examples: Sequence[Example | dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad ``input_ids``/``labels`` to the longest example; return tensors with an attention mask."""
    rows = [e if isinstance(e, dict) else {"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Collator:
    """A picklable collate function for HF Trainer's DataLoader."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_batch(rows, self.pad_id)


class ExampleDataset(torch.utils.data.Dataset):
    """A list of :class:`Example` seen by Trainer as dicts."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}
