"""What several methods and their callers share: module names by kind, LoRA sizes, random adapter weights."""

from __future__ import annotations

from torch import nn

from fanlora.backbone import Backbone
from fanlora.errors import UserError


def module_names(backbone: Backbone, kinds: list[str] | None = None) -> list[str]:
    """The backbone's module names of ``kinds`` (default: every kind it has), layer by layer."""
    layout = backbone.layout
    kinds = kinds or layout.kinds
    return [layout.module_name(k, layer) for layer in range(layout.num_layers) for k in kinds if k in layout.paths]


def randomize(model: nn.Module, seed: int = 0, std: float = 0.02, markers: tuple[str, ...] = ("lora_", "ia3_")) -> None:
    """Random (non-zero) adapter weights: for speed and memory measurements, whose results do not depend on
    the values, and for tests that need an adapter whose effect is visible."""
    import torch

    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if any(m in name for m in markers):
            p.data.normal_(0, std)


def lora_params(backbone: Backbone, modules: list[str], r: int) -> int:
    """Trainable parameters of LoRA rank ``r`` on ``modules``: r·(in + out) each."""
    return sum(r * sum(backbone.layout.shape_of(name)) for name in modules)


def lora_rank_for_budget(backbone: Backbone, modules: list[str], budget: int) -> int:
    """The rank (≥ 1) whose LoRA parameter count on ``modules`` is closest to ``budget``."""
    if not modules:
        raise UserError("no modules to give a rank to: the setting keeps none")
    per_rank = lora_params(backbone, modules, 1)
    return max(1, round(budget / per_rank))
