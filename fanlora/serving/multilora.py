"""The wrapped linear layer of the multi-tenant engine, and how a batch's rows are routed to adapters.

Every wrapped module keeps the adapters' factors stacked — ``A`` as [slots, in, R] and ``s·B`` as [slots, R,
out] (pre-transposed), slot 0 all zeros for "no adapter", ranks zero-padded to the largest R (exact: the padding
adds zeros) — and applies a batch in one of three ways:

- every row on one adapter: two plain matmuls;
- mixed rows in long runs of one adapter (≥ ``MIN_RUN_TOKENS`` tokens per run on average; the continuous
  scheduler packs its tokens grouped by slot, so prefill chunks come this way): each run gets its own adapter's
  two products on its own rows, a view, no copy;
- mixed rows in short runs (decoding: one token per row): the adapters present laid side by side (``A`` as
  [in, U·R], ``B`` as [U·R, out], slot 0 left out), one product with every token, a mask that keeps each
  token's own adapter's R columns, one product back (the segmented idea of Punica's SGMV / S-LoRA as two dense
  GEMMs).

Why two mixed paths, measured on this CPU (whole forwards of the embedded backbone, 60 wrapped modules, four
r=12 adapters, rows grouped by adapter, two threads, ratio to the bare backbone): at 8–16 tokens the stacked
update costs 5–7 % and one update per run 10–11 % (eight small products per module instead of three); at 48
tokens 4 % against 7 %; at 128 both 5–6 %; at 256 tokens (one thread) the runs 2 % against 5 % (the stacked
product multiplies every token by every adapter: 4× the FLOPs). A gather of each group into a padded batched
product was slower than both at 8–48 tokens (the index copies cost more than they save).

Isolation: the run path touches only its own rows; the stacked path zeroes other tenants' columns with
``masked_fill`` (not a 0/1 multiply, which lets an overflow in one tenant's columns turn every row's update into
NaN).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fanlora.backbone import linear_shape

MIN_RUN_TOKENS = 16  # mixed batches with at least this many tokens per run of one adapter: one update per run


def _runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(slot, first index, end index) for each run of equal consecutive slots."""
    out, start = [], 0
    for slot, group in itertools.groupby(slots):
        end = start + sum(1 for _ in group)
        out.append((slot, start, end))
        start = end
    return out


class Rows(threading.local):
    """Which adapter slot each row of the current batch uses (set around every forward)."""

    def __init__(self) -> None:
        self.uniform: int | None = 0  # one slot for every row, or None for a mixed batch
        self.cols: torch.Tensor | None = None  # mixed: the stacked columns of the slots present (None: all)
        self.mask: torch.Tensor | None = None  # mixed: [rows, len(cols)·R] True where a column is not the row's
        self.spans: list[tuple[int, int, int]] = []  # mixed: (slot, first row, end row) per run of one adapter

    def route(self, slots: Sequence[int], rank: int, stacked: int | None, device: torch.device | None) -> None:
        """Route the next forward passes by slot, one entry per row: the runs of rows on one adapter and the
        stacked path's mask and columns, shared by every wrapped module. ``stacked``: slots in the modules'
        stacks (None: nothing is wrapped)."""
        present = sorted(set(slots) - {0})
        if len(set(slots)) == 1 or not present or stacked is None:
            self.uniform, self.cols, self.mask = slots[0] if present and stacked is not None else 0, None, None
            return
        self.spans = [run for run in _runs(slots) if run[0]]
        column_slot = torch.tensor(present, device=device).repeat_interleave(rank)
        self.mask = torch.tensor(slots, device=device)[:, None] != column_slot[None, :]  # True: zeroed
        everyone = present == list(range(1, stacked))
        self.cols = (
            None
            if everyone
            else torch.tensor([(s - 1) * rank + k for s in present for k in range(rank)], device=device)
        )
        self.uniform = None


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus the stacked low-rank updates of every loaded adapter.

    The factors are stored pre-transposed (``A`` as [slots, in, R], ``B`` as [slots, R, out], ``B`` already
    multiplied by the adapter's scaling) so the hot path is ``y += (x·A)·B`` with the second product fused
    into the add (``addmm_`` / ``baddbmm_`` on the base output, no temporary): measured at decode shape on
    this CPU, the update then costs ~5 µs per module against ~15 µs for ``y + x@A.T@B.T``. The base weight
    is applied with ``F.linear`` directly rather than through a nested module call (a GPT-2 ``Conv1D``, whose
    weight is stored in x out, is called as it is).
    """

    def __init__(self, base: nn.Module, rows: Rows) -> None:
        super().__init__()
        self.base, self.rows = base, rows
        self.in_features, self.out_features = linear_shape(base)
        self.plain = isinstance(base, nn.Linear)
        dev, dt = base.weight.device, base.weight.dtype
        self.register_buffer("A", torch.zeros(1, self.in_features, 1, device=dev, dtype=dt), persistent=False)
        self.register_buffer("B", torch.zeros(1, 1, self.out_features, device=dev, dtype=dt), persistent=False)
        self.refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.weight, self.base.bias) if self.plain else self.base(x)
        rows = self.rows
        slot = rows.uniform
        if slot == 0:
            return y
        if slot is not None:
            y.view(-1, self.out_features).addmm_(x.reshape(-1, self.in_features) @ self.A[slot], self.B[slot])
            return y
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= MIN_RUN_TOKENS * len(rows.spans):  # long runs: each its own adapter's update alone
            y2, k = y.view(-1, self.out_features), x2.shape[0] // rows.mask.shape[0]  # tokens per routed row
            for slot, start, end in rows.spans:
                y2[start * k : end * k].addmm_(x2[start * k : end * k] @ self.A[slot], self.B[slot])
            return y
        mask = rows.mask
        if mask.shape[0] != x2.shape[0]:  # a row's tokens (and HF's beams of a row) are contiguous
            mask = mask.repeat_interleave(x2.shape[0] // mask.shape[0], 0)
        a, b = (self.Af, self.Bf) if rows.cols is None else (self.Af[:, rows.cols], self.Bf[rows.cols])
        y.view(-1, self.out_features).addmm_((x2 @ a).masked_fill_(mask, 0.0), b)
        return y

    def refresh(self, slot: int | None = None) -> None:
        """Lay the adapters' stacks (slot 0, the bare backbone, is all zeros: left out) side by side for the
        stacked mixed path; called whenever ``A`` or ``B`` change — with ``slot``, only that slot was written
        (a load: its columns are copied in place, so a load costs the same however many adapters are loaded)."""
        slots, _, rank = self.A.shape
        if slot is not None and slot > 0 and self.Af.shape[1] == (slots - 1) * rank:
            self.Af[:, (slot - 1) * rank : slot * rank] = self.A[slot]
            self.Bf[(slot - 1) * rank : slot * rank] = self.B[slot]
            return
        self.Af = self.A[1:].permute(1, 0, 2).reshape(self.in_features, (slots - 1) * rank).contiguous()
        self.Bf = self.B[1:].reshape((slots - 1) * rank, self.out_features).contiguous()
