"""The continuous scheduler's running batch: its rows' shared, left-padded ``DynamicCache`` and attention mask.

A joining row's cache is padded on the left to the running length (or the running rows' to its) and
concatenated along the batch; a leaving row is removed by indexing; columns that are padding in every row are
trimmed. Each row's position ids count only its real tokens (:mod:`fanlora.serving.continuous`), so a row
decodes exactly as it would alone.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim)


class Batch:
    """The running rows, their shared left-padded KV cache and attention mask (rows × columns)."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 for a real token

    def join(self, rows: list[Any], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add rows whose prompts were prefilled into ``cache`` (left-padded as ``mask``)."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows = self.rows + rows

    def keep(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (indices), then trim the columns that are padding in every kept row."""
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self.mask = mask[:, first:]
        self.rows = [self.rows[i] for i in keep]
