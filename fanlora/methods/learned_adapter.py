"""Learned-Adapter (Zhang et al., ACL 2023, "Learned Adapters Are Better Than Manually Designed Adapters"):
the adapter's architecture searched by gradient on the task, then the found architecture retrained.

Why our own: no maintained library implements it (the authors released no code we could read here; the
``adapters`` library pins another transformers line). The full paper text was not reachable offline either,
so this follows its abstract (a unified search space of adapter architectures, optimised by a gradient-based
NAS, "GDNAS", then retrained) and the FanLoRA paper's appendix (bottleneck 36, adapters "connected to the
whole block"). What is built, and where it is a reconstruction:

- **Search space**, per decoder layer, three places an adapter can connect (its *edges*): ``attn`` — from the
  attention's input to its output (parallel to self-attention), ``ffn`` — parallel to the FFN, and ``block`` —
  from the layer's input to its output, across the whole block. On every edge the operation is one of
  ``zero`` (no adapter) or a bottleneck ``up(act(down(x)))`` of width ``size`` (36) whose activation is one
  of ReLU, GELU, SiLU, tanh or none (a linear adapter). The paper's space is of this kind (where the adapter
  connects, which operation it applies); its exact list of operations is not reproduced.
- **Search** (DARTS-style, first order, as gradient NAS goes): every edge's output is the softmax-weighted
  mixture of its candidate operations (one ``down``/``up`` pair per edge, shared by the activations, so the
  supernet stays small), with one architecture logit per (edge, operation). Weights train on one half of the
  training examples through the normal Trainer; after every optimizer step one batch of the other half
  updates the logits alone (Adam, ``arch_lr``), as DARTS's first-order alternation does. GDNAS's own
  refinement over DARTS is not reproduced (not reachable here).
- **Derivation**: an edge is kept when its strongest activation outweighs ``zero``, with that activation;
  under a parameter ``budget`` (the experiment sets FanLoRA's, as for SSP) the kept edges are taken by
  descending weight while they fit (at least one).
- **Retraining** (faithful in kind): fresh adapters on exactly the kept edges, ``up`` zero-initialised so the
  model starts as the backbone, trained with the task's recipe. Saved as ``learned_adapter_config.json``
  (the architecture) + ``learned_adapter_model.safetensors`` (the adapter weights only).
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import TrainerCallback

from fanlora import atomic
from fanlora.backbone import Backbone, ModuleLayout
from fanlora.data.collate import pad_batch
from fanlora.errors import UserError
from fanlora.methods.registry import register
from fanlora.methods.searched import SearchedMethod

CONFIG = "learned_adapter_config.json"
WEIGHTS = "learned_adapter_model.safetensors"
PLACES = ("attn", "ffn", "block")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


@dataclass(frozen=True)
class Edge:
    place: str
    layer: int
    act: str = ""  # the chosen activation ("" while it is still searched)

    @property
    def key(self) -> str:
        return f"{self.place}.{self.layer}"

    @property
    def label(self) -> str:  # as shown in results: place.layer:activation
        return f"{self.key}:{self.act}"


def edges(layout: ModuleLayout) -> list[Edge]:
    return [Edge(place, layer) for layer in range(layout.num_layers) for place in PLACES]


def _point(model: nn.Module, layout: ModuleLayout, edge: Edge) -> nn.Module:
    """The module whose output the edge adds to (and whose input it reads)."""
    if edge.place == "attn":
        return model.get_submodule(layout.module_name("O", edge.layer).rpartition(".")[0])
    if edge.place == "ffn":
        return model.get_submodule(layout.module_name("D", edge.layer).rpartition(".")[0])
    return model.get_submodule(f"{layout.layers_path}.{edge.layer}")


def cell_params(width: int, size: int) -> int:
    return 2 * size * width + size + width


class Cell(nn.Module):
    """``up(act(down(x)))``; while searching, ``act`` is the mixture of every activation by ``weights``."""

    def __init__(self, width: int, size: int, acts: Sequence[str], like: torch.Tensor) -> None:
        super().__init__()
        self.down = nn.Linear(width, size, device=like.device, dtype=like.dtype)
        self.up = nn.Linear(size, width, device=like.device, dtype=like.dtype)
        nn.init.normal_(self.down.weight, std=0.01)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # the adapter adds nothing until it trains
        nn.init.zeros_(self.up.bias)
        self.acts = nn.ModuleList(ACTIVATIONS[a]() for a in acts)
        self.weights: Callable[[], torch.Tensor] | None = None  # search: the mixture weights of the acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.weights is None:
            return self.up(self.acts[0](h))
        w = self.weights().to(h.dtype)
        return self.up(sum(w[i] * act(h) for i, act in enumerate(self.acts)))


def _hook(cell: Cell) -> Callable[..., Any]:
    def add(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if isinstance(output, tuple):
            return (output[0] + cell(x), *output[1:])
        return output + cell(x)

    return add


def attach(model: nn.Module, layout: ModuleLayout, chosen: list[Edge], size: int, searching: bool = False) -> nn.Module:
    """Freeze ``model`` and add a cell on each edge (all activations while ``searching``, else the edge's own);
    the cells live in ``model.learned_adapters`` so their names are stable for checkpoints and safetensors."""
    if hasattr(model, "learned_adapters"):  # its hooks would stay and add the old cells too
        raise UserError("this model already carries Learned-Adapter cells: load a fresh backbone")
    for p in model.parameters():
        p.requires_grad_(False)
    like = next(model.parameters())
    cells = nn.ModuleDict()
    for edge in chosen:
        width = model.config.hidden_size
        cells[edge.key.replace(".", "_")] = Cell(width, size, list(ACTIVATIONS) if searching else [edge.act], like)
    model.add_module("learned_adapters", cells)
    for edge in chosen:
        _point(model, layout, edge).register_forward_hook(
            _hook(cells[edge.key.replace(".", "_")]), with_kwargs=True
        )  # fmt: skip
    model.learned_adapter_structure = {"edges": [asdict(e) for e in chosen], "size": size}
    return model


class Arch(nn.Module):
    """One logit per (edge, operation); operation 0 is ``zero``, then ``ACTIVATIONS`` in order."""

    def __init__(self, n_edges: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_edges, 1 + len(ACTIVATIONS)), requires_grad=False)
        self.current: torch.Tensor | None = None

    def refresh(self) -> None:
        self.current = torch.softmax(self.logits, dim=-1)


class ArchStep(TrainerCallback):
    """After each weight step, one batch of the held-out half updates the architecture logits alone."""

    def __init__(self, arch: Arch, examples: Sequence[Any], pad_id: int, lr: float, batch: int, seed: int) -> None:
        self.arch, self.pad_id, self.batch = arch, pad_id, batch
        rows = list(examples)
        random.Random(seed).shuffle(rows)
        self.rows = itertools.cycle(rows)
        self.optimizer = torch.optim.Adam([arch.logits], lr=lr, betas=(0.5, 0.999))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        batch = pad_batch([next(self.rows) for _ in range(self.batch)], self.pad_id)
        device = self.arch.logits.device
        self.arch.logits.requires_grad_(True)
        try:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            (grad,) = torch.autograd.grad(loss, [self.arch.logits])
        finally:
            self.arch.logits.requires_grad_(False)
        self.arch.logits.grad = grad
        self.optimizer.step()
        self.arch.logits.grad = None


def derive(
    found: list[Edge], weights: torch.Tensor, params_per_cell: int, budget: int | None
) -> tuple[list[Edge], dict[str, list[float]]]:
    """Edges whose best activation outweighs ``zero`` (with it), by strength, within ``budget``."""
    names = list(ACTIVATIONS)
    table = {e.key: [round(float(v), 5) for v in weights[i]] for i, e in enumerate(found)}
    strength = [(float(weights[i, 1:].max() - weights[i, 0]), i) for i in range(len(found))]
    kept, spent = [], 0
    for margin, i in sorted(strength, reverse=True):
        over = budget is not None and spent + params_per_cell > budget
        if (margin <= 0 or over) and kept:
            continue
        act = names[int(weights[i, 1:].argmax())]
        kept.append(Edge(found[i].place, found[i].layer, act))
        spent += params_per_cell
    return kept, table


def search(
    backbone: Backbone,
    opts: dict[str, Any],
    train: Sequence[Any],
    dev: Sequence[Any],
    params: Any,
    directory: Path,
    pad_id: int,
    train_fn: Callable[..., Any],
) -> tuple[list[Edge], float]:
    """The architecture search on a copy of the backbone; resumable (``structure.json`` marks it done)."""
    done = directory / "structure.json"
    if done.is_file():
        record = json.loads(done.read_text())
        return [Edge(**e) for e in record["chosen"]], record["minutes"]
    if len(train) < 2:
        raise UserError("learned-adapter's search needs at least 2 training examples (half train the architecture)")
    start = time.time()
    found = edges(backbone.layout)
    model = attach(copy.deepcopy(backbone.model), backbone.layout, found, opts["size"], searching=True)
    arch = Arch(len(found))
    model.add_module("learned_adapter_arch", arch)
    model.register_forward_pre_hook(lambda m, a: arch.refresh())
    for i, cell in enumerate(model.learned_adapters.values()):
        cell.weights = lambda i=i: arch.current[i, 1:]  # the zero op adds nothing: it only dilutes the others
        for p in cell.parameters():
            p.requires_grad_(True)
    step = ArchStep(arch, train[1::2], pad_id, opts["arch_lr"], opts["arch_batch"], seed=0)
    train_fn(model, train[0::2], dev, params, directory, pad_id, [step], lambda m, d: None)
    weights = torch.softmax(arch.logits.detach(), dim=-1)
    per_cell = cell_params(backbone.model.config.hidden_size, opts["size"])
    chosen, table = derive(found, weights, per_cell, opts.get("budget"))
    minutes = (time.time() - start) / 60
    record = {
        "budget": opts.get("budget"),
        "chosen": [asdict(e) for e in chosen],
        "params": per_cell * len(chosen),
        "operations": ["zero", *ACTIVATIONS],
        "weights": table,
        "minutes": minutes,
    }
    atomic.write_json(done, record)
    return chosen, minutes


def retrain_model(backbone: Backbone, chosen: list[Edge], opts: dict[str, Any]) -> nn.Module:
    """The second phase's model: fresh adapters on exactly the found edges; only they train."""
    model = attach(backbone.model, backbone.layout, chosen, opts["size"])
    for p in model.learned_adapters.parameters():
        p.requires_grad_(True)
    return model


def save(model: nn.Module, directory: str | Path) -> Path:
    weights = dict(model.learned_adapters.named_parameters())
    return atomic.write_weights(directory, weights, WEIGHTS, CONFIG, model.learned_adapter_structure)


def load(backbone: Backbone, directory: str | Path) -> nn.Module:
    """The retrained Learned-Adapter model on ``backbone`` from ``save``'s directory."""
    structure, weights = atomic.read_weights(directory, WEIGHTS, CONFIG, "Learned-Adapter")
    model = attach(backbone.model, backbone.layout, [Edge(**e) for e in structure["edges"]], structure["size"])
    expected = dict(model.learned_adapters.named_parameters())
    if set(weights) != set(expected) or any(weights[n].shape != p.shape for n, p in expected.items()):
        raise UserError(f"{Path(directory) / WEIGHTS} does not match its structure: saved for another model")
    model.learned_adapters.load_state_dict(weights)
    return model


class LearnedAdapter(SearchedMethod):
    name = "learned-adapter"
    order = 6
    defaults: ClassVar[dict[str, Any]] = {"size": 36, "budget": None, "arch_lr": 0.05, "arch_batch": 4}
    config_file = CONFIG
    search = staticmethod(search)
    retrain_model = staticmethod(retrain_model)
    save = staticmethod(save)
    load = staticmethod(load)

    def describe(self, label: str) -> tuple[str, int]:  # attn.3:gelu
        where, _, act = label.partition(":")
        place, _, layer = where.partition(".")
        return f"{place} adapter ({act})", int(layer)


register(LearnedAdapter())
