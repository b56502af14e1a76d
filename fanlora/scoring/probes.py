"""Placement scores read off activations and gradients with hooks: the engines of the 2025–26 rivals.

None of these needs the gate machinery of eq. 3, and two need no stage a at all, so they run on whatever model
they are given (the bare backbone, or the stage-a PEFT model for ``lora-drop``). Each validation batch is one
unit of work (recorded as it finishes, split over processes, added up at the end), except the gradient norm,
whose Frobenius norm of a *summed* gradient is not a sum of per-batch values: it is one unit, the whole set.

What each computes, per (kind, layer) module with weight W (out x in) and input rows x_t (every non-padding
token t of the batch):

* :func:`run_nfn` — PLoP's normalised feature norm, ``||W x_t|| / E||W z||`` with z a random Gaussian vector of
  x_t's norm, averaged over tokens. The denominator is taken in closed form through its second moment,
  ``E||W z||² = ||x_t||² ||W||_F² / in``, instead of one random draw per token (PLoP draws one): the same
  statistic without sampling noise.
* :func:`run_lora_out` — LoRA-drop's importance: the mean squared norm of the stage-a LoRA branch's output,
  ``||s · B A x_t||²``, all LoRA modules on.
* :func:`run_grad_norm` — the Layer-Card resnorm as a normalised gradient norm: ``||∂L/∂W||_F`` of the mean
  response-token loss over the whole set, divided by ``sqrt(Σ_t ||x_t||² / in)`` (the RMS input coordinate
  over the set's tokens) — the projected residual norm under an isotropic input covariance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fanlora.backbone import module_key
from fanlora.data.instruct import IGNORE
from fanlora.errors import UserError
from fanlora.scoring.journal import Journal
from fanlora.scoring.replay import Batch

Tick = Callable[[int], None]


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as (out, in): ``nn.Linear`` stores it so, GPT-2's ``Conv1D`` transposed."""
    base = getattr(module, "base_layer", module)
    w = base.weight
    return w if isinstance(base, nn.Linear) else w.t()


def _modules(model: nn.Module, layout: Any) -> dict[str, nn.Module]:
    return {module_key(k, n): model.get_submodule(layout.module_name(k, n)) for k, n in layout.all_modules()}


@contextmanager
def _inputs_of(modules: dict[str, nn.Module], on_input: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator:
    """Call ``on_input(key, module, x)`` with every module's input during the block."""
    handles = [
        m.register_forward_pre_hook(lambda mod, args, key=key: on_input(key, mod, args[0]))
        for key, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The non-padding token rows of a (batch, time, features) input, as fp32 (tokens, features)."""
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()].float()


Stat = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _per_batch(model: nn.Module, batches: Sequence[Batch], progress: Journal, mine: Sequence[int], tick: Tick,
               modules: dict[str, nn.Module], stat: Stat) -> None:  # fmt: skip
    """For each batch of ``mine``: Σ over tokens of ``stat(module, rows)`` per module, and the token count."""
    for i in mine:
        if f"b{i}" in progress.done:
            continue
        batch = batches[i]
        sums: dict[str, float] = {}

        def on_input(key: str, module: nn.Module, x: torch.Tensor, batch: Batch = batch, sums: dict = sums) -> None:
            sums[key] = float(stat(module, _rows(x, batch.attention_mask)).sum())

        with torch.no_grad(), _inputs_of(modules, on_input):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        progress.record({"id": f"b{i}", "sum": sums, "n": int(batch.attention_mask.sum())})
        tick(1)


def _nfn_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = weight_out_in(module).float()
    expected = x.norm(dim=1) * w.norm() / w.shape[1] ** 0.5  # sqrt(E||W z||²), z ~ N(0, ||x||²/in · I)
    return (x @ w.t()).norm(dim=1) / expected.clamp_min(1e-30)


def run_nfn(model: nn.Module, layout: Any, batches: Sequence[Batch], progress: Journal, mine: Sequence[int],
            tick: Tick = lambda n: None) -> None:  # fmt: skip
    """PLoP's NFN summed over each batch's tokens, per module (of the bare backbone)."""
    _per_batch(model, batches, progress, mine, tick, _modules(model, layout), _nfn_rows)


def _lora_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    name = module.active_adapters[0]
    a, b = module.lora_A[name].weight.float(), module.lora_B[name].weight.float()
    return ((x @ a.t()) @ b.t() * module.scaling[name]).pow(2).sum(dim=1)


def run_lora_out(model: nn.Module, layout: Any, batches: Sequence[Batch], progress: Journal, mine: Sequence[int],
                 tick: Tick = lambda n: None) -> None:  # fmt: skip
    """LoRA-drop's squared LoRA output norm summed over each batch's tokens, per module (stage-a model)."""
    _per_batch(model, batches, progress, mine, tick, _modules(model, layout), _lora_rows)


def mean_per_token(entries: dict[str, dict[str, Any]], keys: list[str], n_batches: int) -> dict[str, float]:
    """Σ over batches of the per-module sums, divided by the tokens seen; an incomplete set is refused."""
    missing = [f"b{i}" for i in range(n_batches) if f"b{i}" not in entries]
    if missing:
        raise UserError(
            f"the scores are incomplete: no statistics for batch {', '.join(missing[:4])} — give every shard "
            "(or re-run `fanlora score` to finish)"
        )
    n = sum(entries[f"b{i}"]["n"] for i in range(n_batches))
    return {k: sum(entries[f"b{i}"]["sum"][k] for i in range(n_batches)) / n for k in keys}


def run_grad_norm(model: nn.Module, layout: Any, batches: Sequence[Batch], progress: Journal, n_tokens: int,
                  tick: Tick = lambda n: None) -> None:  # fmt: skip
    """The normalised gradient norm of every module over the whole set, recorded as one entry ``all``."""
    if "all" in progress.done:
        return
    modules = _modules(model, layout)
    energy = dict.fromkeys(modules, 0.0)
    weights = {key: getattr(m, "base_layer", m).weight for key, m in modules.items()}
    grads = {key: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for key, w in weights.items()}
    with _only_these_trainable(model, list(weights.values())):
        for batch in batches:

            def on_input(key: str, module: nn.Module, x: torch.Tensor, batch: Batch = batch) -> None:
                energy[key] += float(_rows(x.detach(), batch.attention_mask).pow(2).sum())

            with _inputs_of(modules, on_input):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            labels = batch.labels[:, 1:]
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                  reduction="sum")  # fmt: skip
            for key, g in zip(weights, torch.autograd.grad(nll / n_tokens, list(weights.values())), strict=True):
                grads[key] += g.float()
            tick(1)
    values = {}
    for key, g in grads.items():
        d_in = weight_out_in(modules[key]).shape[1]
        values[key] = float(g.norm()) / max((energy[key] / d_in) ** 0.5, 1e-30)
    progress.record({"id": "all", "grad_norm": {k: float(g.norm()) for k, g in grads.items()},
                     "energy": energy, "value": values})  # fmt: skip


@contextmanager
def _only_these_trainable(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Gradients for ``params`` only (the graph holds nothing else); every flag restored afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
