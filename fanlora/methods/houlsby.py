"""Houlsby bottleneck adapters (Houlsby et al., 2019): the paper's "adapter" baseline.

Why our own: the maintained library for these (``adapters``) pins its own transformers line and would
replace ours; PEFT has no bottleneck adapter. The module is small: after the attention output projection
and after the FFN's down projection of every layer, ``y + up(act(down(y)))`` with a bottleneck of 18, the
up projection zero-initialised so training starts from the backbone's own function. (Houlsby's design also
tunes the layer norms; like the paper's baseline table we count and train the adapter weights only.)

Saved as ``houlsby_config.json`` + ``houlsby_model.safetensors`` (adapter weights only, never the backbone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fanlora import atomic
from fanlora.backbone import Backbone, ModuleLayout, linear_shape
from fanlora.errors import UserError
from fanlora.methods.registry import BuildContext, Built, Method, register

CONFIG = "houlsby_config.json"
WEIGHTS = "houlsby_model.safetensors"


class Bottleneck(nn.Module):
    """A frozen linear layer (or a PEFT layer around one) followed by a residual bottleneck adapter on its
    output of width ``width``; ``like`` gives the device and dtype."""

    def __init__(self, base: nn.Module, size: int, width: int, like: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(width, size, device=like.device, dtype=like.dtype)
        self.up = nn.Linear(size, width, device=like.device, dtype=like.dtype)
        nn.init.normal_(self.down.weight, std=0.01)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.up(self.act(self.down(y)))


def add(model: nn.Module, layout: ModuleLayout, size: int = 18, kinds: tuple[str, ...] = ("O", "D")) -> list[str]:
    """Freeze ``model`` and put a bottleneck after the given module kinds of every layer; their names."""
    if size < 1:
        raise UserError(f"houlsby bottleneck size must be >= 1, got {size}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [layout.module_name(kind, layer) for layer in range(layout.num_layers) for kind in kinds]
    wrap(model, names, size)
    model.houlsby_config = {"size": size, "kinds": list(kinds), "modules": names}
    return names


def wrap(model: nn.Module, names: list[str], size: int) -> list[Bottleneck]:
    """A bottleneck after each named module (its output's width); nothing is frozen or unfrozen here."""
    out = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        bottleneck = Bottleneck(base, size, linear_shape(base)[1], next(base.parameters()))  # PEFT layers too
        setattr(parent, child, bottleneck)
        out.append(bottleneck)
    return out


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().contiguous()
        for n, p in model.named_parameters()
        if ".down." in n or ".up." in n
        if isinstance(model.get_submodule(n.rsplit(".", 2)[0]), Bottleneck)
    }


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter weights and their config into ``directory`` (made if missing, each file atomically)."""
    return atomic.write_weights(directory, state(model), WEIGHTS, CONFIG, model.houlsby_config)


def load(model: nn.Module, layout: ModuleLayout, directory: str | Path) -> nn.Module:
    config, weights = atomic.read_weights(directory, WEIGHTS, CONFIG, "Houlsby")
    add(model, layout, config["size"], tuple(config["kinds"]))
    missing = set(state(model)) - set(weights)
    if missing:
        raise UserError(f"{Path(directory) / WEIGHTS} lacks {sorted(missing)[0]}: saved for another model")
    model.load_state_dict(weights, strict=False)
    return model


class Houlsby(Method):
    name = "houlsby"
    order = 4
    defaults: ClassVar[dict[str, Any]] = {"size": 18, "kinds": ["O", "D"]}
    config_file = CONFIG

    def build(self, backbone: Backbone, opts: dict[str, Any], ctx: BuildContext) -> Built:
        add(backbone.model, backbone.layout, opts["size"], tuple(opts["kinds"]))
        return Built(backbone.model, self.name, self.trainable(backbone.model), custom_save=save)

    def load(self, backbone: Backbone, directory: Path) -> nn.Module:
        return load(backbone.model, backbone.layout, directory)


register(Houlsby())
