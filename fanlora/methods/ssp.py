"""SSP, sparse structure search for parameter-efficient tuning (Hu et al., 2022, "S3Delta"), for one task.

Why our own: no maintained library implements it for current transformers (the authors' code is built on an
old OpenDelta and T5). What is kept from the paper, and what is simplified:

- **Search space** (faithful in kind, smaller in breadth): per decoder layer, LoRA of rank ``r`` on each
  linear kind (Q, K, V, O, Gate, Up, Down) and a bottleneck adapter of width ``size`` after the attention
  output (O) and after the FFN (Down) — 9 candidates per layer. The paper's space also has bias tuning,
  LayerNorm tuning and low-rank adapters; here LoRA and bottleneck adapters stand for the two families.
- **Search** (faithful): every candidate's output is multiplied by a gate ``p_i = sigmoid((α_i + b) / τ)``
  with one learnable logit per candidate and the paper's *shifted global sigmoid*: the shift ``b`` is solved
  at every forward (bisection, where the paper calls ``fsolve``) so the expected trainable parameters
  ``Σ p_i · n_i`` equal the budget; the temperature τ anneals from ``tau_start`` to ``tau_end``.
  Simplified: weights and logits are trained together on the task's training data (first-order, one level);
  the paper alternates them on a train/dev split as DARTS does. The logits learn ``alpha_scale`` times faster
  than the weights (the paper uses a separate, larger learning rate for them).
- **Retraining** (faithful): candidates are kept by descending logit while they fit in the budget; fresh LoRA
  (PEFT) and bottleneck adapters are put on exactly those (B and the adapters' up projections zero, so the
  model starts as the backbone) and trained with the task's recipe.

The budget is FanLoRA's trainable-parameter count in the experiment (the paper matches SSP's sparsity to the
method it is compared with). Saved as ``ssp_config.json`` (the structure) + ``ssp_model.safetensors`` (the
retrained weights only).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import TrainerCallback

from fanlora import atomic
from fanlora.backbone import Backbone, ModuleLayout
from fanlora.errors import UserError
from fanlora.methods import houlsby
from fanlora.methods.fanlora import ALPHA, RANK
from fanlora.methods.registry import register
from fanlora.methods.searched import SearchedMethod

CONFIG = "ssp_config.json"
WEIGHTS = "ssp_model.safetensors"
ADAPTER_KINDS = ("O", "D")  # bottleneck adapters after attention and after the FFN


@dataclass(frozen=True)
class Candidate:
    kind: str
    layer: int
    family: str  # "lora" | "adapter"
    params: int

    @property
    def key(self) -> str:
        return f"{self.family}:{self.kind}.{self.layer}"

    label = key  # as shown in results


def candidates(backbone: Backbone, r: int, size: int) -> list[Candidate]:
    """Every (kind, layer) LoRA and every adapter place, with its trainable parameter count."""
    layout, out = backbone.layout, []
    for kind, layer in layout.all_modules():
        n_in, n_out = layout.shape(kind, layer)
        out.append(Candidate(kind, layer, "lora", r * (n_in + n_out)))
        if kind in ADAPTER_KINDS:
            out.append(Candidate(kind, layer, "adapter", 2 * size * n_out + size + n_out))
    return out


def choose(cands: list[Candidate], logits: list[float], budget: int) -> list[Candidate]:
    """Candidates by descending logit, each kept if it still fits in the budget (at least the best one)."""
    order = sorted(range(len(cands)), key=lambda i: -logits[i])
    chosen, spent = [], 0
    for i in order:
        if spent + cands[i].params <= budget or not chosen:
            chosen.append(cands[i])
            spent += cands[i].params
    return chosen


class Gates(nn.Module):
    """One logit per candidate; ``probs()`` is the budget-shifted sigmoid of the paper."""

    def __init__(self, sizes: list[int], budget: int, alpha_scale: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(len(sizes)))
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.float32), persistent=False)
        self.budget, self.alpha_scale, self.tau = float(budget), alpha_scale, 1.0
        self.current: torch.Tensor | None = None  # this forward's gate values

    @property
    def alpha(self) -> torch.Tensor:
        return self.theta * self.alpha_scale

    def shift(self, alpha: torch.Tensor) -> float:
        """The b with Σ sigmoid((α + b)/τ)·n = budget (monotone in b: bisection)."""
        lo, hi = -200.0, 200.0
        with torch.no_grad():
            for _ in range(60):
                mid = (lo + hi) / 2
                spent = (torch.sigmoid((alpha + mid) / self.tau) * self.sizes).sum().item()
                lo, hi = (mid, hi) if spent < self.budget else (lo, mid)
        return (lo + hi) / 2

    def probs(self) -> torch.Tensor:
        alpha = self.alpha
        return torch.sigmoid((alpha + self.shift(alpha.detach())) / self.tau)


class _Anneal(TrainerCallback):
    def __init__(self, gates: Gates, start: float, end: float) -> None:
        self.gates, self.start, self.end = gates, start, end

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        frac = state.global_step / max(1, state.max_steps)
        self.gates.tau = self.start * (self.end / self.start) ** frac  # geometric, as temperature schedules go


def _target(layout: ModuleLayout, c: Candidate) -> str:
    return layout.module_name(c.kind, c.layer)


def _build(model: nn.Module, layout: ModuleLayout, chosen: list[Candidate], opts: dict[str, Any]) -> nn.Module:
    """LoRA (PEFT's layers) on the chosen linear modules, then bottlenecks at the chosen places; only those
    train. Returned unwrapped from the PeftModel, like the Houlsby baseline, so the Trainer checkpoints every
    trained tensor (LoRA, adapters, gate logits), not only the LoRA adapter."""
    loras = [_target(layout, c) for c in chosen if c.family == "lora"]
    if loras:
        config = LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], target_modules=loras, task_type="CAUSAL_LM")
        model = get_peft_model(model, config).get_base_model()
    for p in model.parameters():
        p.requires_grad_(False)
    bottlenecks = houlsby.wrap(model, [_target(layout, c) for c in chosen if c.family == "adapter"], opts["size"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    for b in bottlenecks:
        for p in [*b.down.parameters(), *b.up.parameters()]:
            p.requires_grad_(True)
    model.ssp_structure = {"candidates": [asdict(c) for c in chosen], "options": opts}
    return model


def _gate_hooks(model: nn.Module, layout: ModuleLayout, cands: list[Candidate], gates: Gates) -> None:
    """Multiply each candidate's delta by its gate: hooks on LoRA's B and on the adapter's up projection."""

    def top(module: nn.Module, args: Any) -> None:
        gates.current = gates.probs()

    model.register_forward_pre_hook(top)
    for i, c in enumerate(cands):
        module = model.get_submodule(_target(layout, c))
        if c.family == "adapter":
            target = module.up
        else:
            lora = module.base if isinstance(module, houlsby.Bottleneck) else module
            assert isinstance(lora, LoraLayer)
            target = lora.lora_B["default"]
        target.register_forward_hook(lambda m, a, out, i=i: out * gates.current[i].to(out.dtype))


def search(
    backbone: Backbone,
    opts: dict[str, Any],
    train: Any,
    dev: Any,
    params: Any,
    directory: Path,
    pad_id: int,
    train_fn: Callable[..., Any],
) -> tuple[list[Candidate], float]:
    """Phase 1 on a copy of the backbone: gated candidates trained under the budget; the chosen structure.

    Resumable: a finished search leaves ``structure.json`` in ``directory`` and is not run again.
    """
    done = directory / "structure.json"
    cands = candidates(backbone, opts["r"], opts["size"])
    keys = {c.key: c for c in cands}
    if done.is_file():
        record = json.loads(done.read_text())
        return [keys[k] for k in record["chosen"]], record["minutes"]
    start = time.time()
    model = _build(copy.deepcopy(backbone.model), backbone.layout, cands, opts)
    gates = Gates([c.params for c in cands], opts["budget"], opts["alpha_scale"])
    model.add_module("ssp_gates", gates)
    _gate_hooks(model, backbone.layout, cands, gates)
    callbacks = [_Anneal(gates, opts["tau_start"], opts["tau_end"])]
    train_fn(model, train, dev, params, directory, pad_id, callbacks, lambda m, d: None)
    logits = gates.alpha.detach().tolist()
    chosen = choose(cands, logits, opts["budget"])
    minutes = (time.time() - start) / 60
    record = {
        "budget": opts["budget"],
        "chosen": [c.key for c in chosen],
        "params": sum(c.params for c in chosen),
        "logits": dict(zip([c.key for c in cands], logits, strict=True)),
        "minutes": minutes,
    }
    atomic.write_json(done, record)
    return chosen, minutes


def retrain_model(backbone: Backbone, chosen: list[Candidate], opts: dict[str, Any]) -> nn.Module:
    """Phase 2's model: fresh LoRA and adapters on the chosen candidates of ``backbone.model``."""
    return _build(backbone.model, backbone.layout, chosen, opts)


def save(model: nn.Module, directory: str | Path) -> Path:
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return atomic.write_weights(directory, weights, WEIGHTS, CONFIG, model.ssp_structure)


def load(backbone: Backbone, directory: str | Path) -> nn.Module:
    """The retrained SSP model on ``backbone`` from ``save``'s directory."""
    structure, weights = atomic.read_weights(directory, WEIGHTS, CONFIG, "SSP")
    chosen = [Candidate(**c) for c in structure["candidates"]]
    model = _build(backbone.model, backbone.layout, chosen, structure["options"])
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise UserError(f"{Path(directory) / WEIGHTS} does not match its structure: saved for another model")
    model.load_state_dict(weights, strict=False)
    return model


class SSP(SearchedMethod):
    name = "ssp"
    order = 5
    defaults: ClassVar[dict[str, Any]] = {
        "r": RANK, "alpha": ALPHA, "size": 18, "budget": None, "alpha_scale": 100.0, "tau_start": 1.0, "tau_end": 0.1,
    }  # fmt: skip
    budget_required = True
    config_file = CONFIG
    search = staticmethod(search)
    retrain_model = staticmethod(retrain_model)
    save = staticmethod(save)
    load = staticmethod(load)

    def describe(self, label: str) -> tuple[str, int]:  # lora:Q.3, adapter:O.5
        family, _, where = label.partition(":")
        kind, _, layer = where.partition(".")
        return (f"LoRA {kind}" if family == "lora" else f"adapter after {kind}"), int(layer)


register(SSP())
