"""Run a causal LM's decoder from any layer, starting from a cached hidden state.

Switching a gate at layer l cannot change anything before layer l, so an ablation at layer l only needs
layers l..L−1: the hidden state entering layer l is the same as in the pass it is ablated from. To reuse
the model's own forward — its masks, rotary embeddings, final norm — rather than re-implement them per
architecture, layers 0..l−1 are swapped for a :class:`_Replay` that returns the cached state, and forward
pre-hooks on the real layers record the states entering them. Logits are computed only at the positions
whose loss counts (the LM head is the largest matmul of a small model over a 49k vocabulary).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fanlora.data.instruct import IGNORE


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns the cached hidden state, whatever it is given."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.hidden = hidden
        self.as_tuple = as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


@dataclass
class Batch:
    """One padded validation batch on the model's device."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_scored(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


class Replayer:
    """Forward passes of ``lm`` that may start at layer ``start`` from a given hidden state."""

    def __init__(self, lm: nn.Module, layers_path: str) -> None:
        self.lm = lm
        self.decoder = lm.get_decoder()
        self.head = lm.get_output_embeddings()
        self.layers: nn.ModuleList = lm.get_submodule(layers_path)
        self.num_layers = len(self.layers)
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)
        self._tuple_output: bool | None = None

    @contextmanager
    def _replaying(self, start: int, hidden: torch.Tensor | None) -> Iterator[None]:
        if start == 0:
            yield
            return
        if self._tuple_output is None:
            raise RuntimeError("run a pass from layer 0 before replaying from a later layer")
        real = [self.layers[i] for i in range(start)]
        replay = _Replay(hidden, self._tuple_output)
        try:
            for i in range(start):
                self.layers[i] = replay
            yield
        finally:
            for i, layer in enumerate(real):
                self.layers[i] = layer

    def forward(
        self,
        batch: Batch,
        replicas: int = 1,
        start: int = 0,
        hidden: torch.Tensor | None = None,
        capture: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Summed response NLL per replica ([replicas], float32) and, if ``capture``, the hidden states
        entering layers ``start..L−1`` (index i ↔ layer start+i).

        The batch is repeated ``replicas`` times along the batch axis, replica-major, so per-row gates can
        give each replica its own gate setting. ``hidden`` ([replicas·rows, T, H]) enters layer ``start``.
        """
        ids = batch.input_ids.repeat(replicas, 1)
        mask = batch.attention_mask.repeat(replicas, 1)
        labels = batch.labels.repeat(replicas, 1)
        captured: list[torch.Tensor] = []
        handles = []
        if capture or self._tuple_output is None:
            for i in range(start, self.num_layers):
                handles.append(self.layers[i].register_forward_pre_hook(self._recorder(captured), with_kwargs=True))
            handles.append(self.layers[self.num_layers - 1].register_forward_hook(self._shape_probe))
        try:
            with self._replaying(start, hidden):
                out = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        last = out.last_hidden_state[:, :-1]
        target = labels[:, 1:]
        where = target != IGNORE
        logits = self.head(last[where])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 → fp32; fp64 stays
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        nll = F.cross_entropy(logits, target[where], reduction="none")
        replica = where.nonzero()[:, 0] // batch.rows
        per_replica = torch.zeros(replicas, dtype=nll.dtype, device=nll.device).index_add_(0, replica, nll)
        return per_replica, (captured if capture else None)

    @staticmethod
    def _recorder(store: list[torch.Tensor]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            store.append((args[0] if args else kwargs["hidden_states"]).detach())

        return hook

    def _shape_probe(self, module: nn.Module, args: tuple, output) -> None:
        self._tuple_output = isinstance(output, tuple)
