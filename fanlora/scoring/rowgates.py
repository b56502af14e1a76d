"""Gates as tensors: each LoRA output multiplied by its own gate, which may differ per batch row.

PEFT's switch (``enable_adapters``) is one bit per module for the whole batch. The fast scorers need more:
the exact engine runs several ablations of one layer side by side in one batch (row r has module m off,
row r' has module m' off), and the gradient scorers need ∂S/∂g — the paper's eq. 2 gate as a real
number. So while :class:`RowGates` is active, every PEFT switch is off (each wrapped layer runs only its
base layer) and a forward hook adds ``g · scaling · B(A(x))`` itself, with PEFT's own A, B and scaling.
A gate of ``None`` skips the LoRA arithmetic entirely; ``True`` adds it unscaled (bit-identical to PEFT);
a tuple of row ranges adds it, unscaled, to those rows only — the 0/1 gates of batched ablations, without
computing LoRA for rows that would multiply it by zero; a tensor scales it (one value, or one per row).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fanlora.gates import GatedLoRA, Key

RowRanges = tuple[tuple[int, int], ...]
Gate = None | bool | RowRanges | torch.Tensor


class RowGates:
    """Per-(kind, layer) gate values applied by forward hooks; set ``gates[key]`` before each forward."""

    def __init__(self, gated: GatedLoRA) -> None:
        self.gated = gated
        self.gates: dict[Key, Gate] = dict.fromkeys(gated.keys)
        self._handles: list[Any] = []

    def set_all(self, value: Gate) -> None:
        for key in self.gates:
            self.gates[key] = value

    def _hook(self, key: Key):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            gate = self.gates[key]
            if gate is None or gate is False:
                return output
            x = args[0]
            name = module.active_adapters[0]
            lora_a, lora_b = module.lora_A[name], module.lora_B[name]

            def lora(x: torch.Tensor) -> torch.Tensor:
                return lora_b(lora_a(module.lora_dropout[name](x.to(lora_a.weight.dtype)))) * module.scaling[name]

            if isinstance(gate, tuple):  # 0/1 per row, as contiguous ranges of ones (no autograd here)
                for start, end in gate:
                    output[start:end] = (output[start:end] + lora(x[start:end])).to(output.dtype)
                return output
            delta = lora(x)
            if gate is not True:
                # a gate per row ([rows]) or one for all (0-dim); broadcast over the sequence and features
                delta = delta * gate.reshape(-1, *([1] * (delta.dim() - 1))) if gate.dim() else delta * gate
            return (output + delta).to(output.dtype)

        return hook

    @contextmanager
    def active(self) -> Iterator[RowGates]:
        """Switch PEFT's own gates off and ours on; restore both on exit."""
        saved = {k: self.gated.is_on(k) for k in self.gates}
        self.gated.set_all(False)
        try:
            for key, layer in self.gated._layers.items():
                self._handles.append(layer.register_forward_hook(self._hook(key)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.gated._restore(saved)


def row_gate(values: list[float], rows_per_replica: int, device: torch.device, dtype: torch.dtype) -> Gate:
    """A gate from one value per replica (replica-major rows): ``None`` if all zero, ``True`` if all one,
    row ranges if every value is 0 or 1, else a row tensor."""
    if not any(values):
        return None
    if all(v == 1 for v in values):
        return True
    if all(v in (0, 1) for v in values):
        ranges, start = [], None
        for i, v in enumerate([*values, 0]):
            if v == 1 and start is None:
                start = i
            elif v != 1 and start is not None:
                ranges.append((start * rows_per_replica, i * rows_per_replica))
                start = None
        return tuple(ranges)
    return torch.tensor(values, device=device, dtype=dtype).repeat_interleave(rows_per_replica)
