"""The fine-tuning methods compared in the paper's Table 1, all built for one training path (``train.py``).

- ``fanlora``: LoRA (rank r1) on exactly the setting's modules (stage d).
- ``lora``: LoRA on every linear module of every layer; rank 4 as the paper's baseline.
- ``adalora``: PEFT's AdaLoRA on every module, initial rank 8, target average rank 4 (half the budget pruned);
  ``update_and_allocate`` is called after every optimizer step, while the gradients are still there (a
  Trainer callback on ``on_optimizer_step``: at ``on_step_end`` they are already zeroed).
- ``ia3``: PEFT's (IA)3 on K, V and the FFN's down projection (the (IA)3 paper's placement).
- ``houlsby``: bottleneck adapters of size 18 after attention and after the FFN (``fanlora.houlsby``).
- ``ssp``: sparse structure search (``fanlora.ssp``): gated LoRA and adapter candidates searched on the task
  under a parameter budget (FanLoRA's, set by the experiment), then the chosen structure retrained. Its
  ``Built`` carries a ``search`` step that the experiment runs before training.
- ``learned-adapter``: Learned-Adapter (``fanlora.learned_adapter``): where bottleneck-36 adapters connect in
  each block and with which activation, searched by gradient (DARTS-style) on the task, then retrained; the
  same ``search`` step, under the same budget when the experiment sets one.

:func:`lora_rank_for_budget` picks the LoRA rank whose parameter count comes closest to a budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import TrainerCallback

from fanlora import houlsby
from fanlora.backbone import Backbone
from fanlora.errors import UserError
from fanlora.setting import Setting

METHODS = ("fanlora", "lora", "adalora", "ia3", "houlsby", "ssp", "learned-adapter")
#: Methods that search their structure on the task first, under a parameter budget the experiment sets.
SEARCHED = ("ssp", "learned-adapter")
#: Defaults per method (overridable by an experiment's ``method_options``).
DEFAULTS: dict[str, dict[str, Any]] = {
    "fanlora": {"r": 12, "alpha": 24},
    "lora": {"r": 4, "alpha": 8},
    "adalora": {"init_r": 8, "target_r": 4, "alpha": 8, "tinit_ratio": 0.1, "tfinal_ratio": 0.2, "delta_t": 1},
    "ia3": {"kinds": ["K", "V", "D"], "feedforward": ["D"]},
    "houlsby": {"size": 18, "kinds": ["O", "D"]},
    "ssp": {"r": 12, "alpha": 24, "size": 18, "budget": None, "alpha_scale": 100.0, "tau_start": 1.0, "tau_end": 0.1},
    "learned-adapter": {"size": 36, "budget": None, "arch_lr": 0.05, "arch_batch": 4},
}


class AdaLoraStep(TrainerCallback):
    """Budget reallocation after each optimizer step, with the step's gradients still in place."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model.base_model.update_and_allocate(state.global_step)


@dataclass
class Built:
    """A model ready for ``train_adapter``, its callbacks and how to save what was trained."""

    model: nn.Module
    method: str
    trainable: int
    callbacks: list[Any] = field(default_factory=list)
    custom_save: Any = None  # callable(model, dir) for non-PEFT models (train.train_adapter calls it)
    # SEARCHED: callable(train, dev, train_params, cell_dir, pad_id) → the Built to train (searches first)
    search: Any = None
    search_minutes: float | None = None
    structure: list[str] | None = None  # SEARCHED: what the search kept


def check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: methods are {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(DEFAULTS[method]))
    if unknown:
        raise UserError(
            f"unknown option {unknown[0]!r} for method {method}: valid are {', '.join(sorted(DEFAULTS[method]))}"
        )
    return {**DEFAULTS[method], **options}


def _names(backbone: Backbone, kinds: list[str] | None = None) -> list[str]:
    layout = backbone.layout
    kinds = kinds or layout.kinds
    return [layout.module_name(k, layer) for layer in range(layout.num_layers) for k in kinds if k in layout.paths]


def build(
    method: str,
    backbone: Backbone,
    options: dict[str, Any] | None = None,
    setting: Setting | None = None,
    total_steps: int = 0,
    dropout: float = 0.0,
) -> Built:
    """Wrap ``backbone.model`` for ``method``; only the method's own parameters stay trainable."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig, get_peft_model

    opts = check_options(method, dict(options or {}))
    model = backbone.model
    if method == "fanlora":
        if setting is None:
            raise UserError("method fanlora needs a setting (setting.json from `fanlora select`)")
        setting.validate(backbone)
        peft = get_peft_model(model, setting.lora_config(opts["r"], opts["alpha"], dropout))
        return Built(peft, method, peft.get_nb_trainable_parameters()[0])
    if method == "lora":
        config = LoraConfig(
            r=opts["r"],
            lora_alpha=opts["alpha"],
            lora_dropout=dropout,
            target_modules=_names(backbone),
            task_type="CAUSAL_LM",
        )
        peft = get_peft_model(model, config)
        return Built(peft, method, peft.get_nb_trainable_parameters()[0])
    if method == "adalora":
        if total_steps < 1:
            raise UserError("adalora needs the number of training steps (its budget schedule is by step)")
        tinit = int(opts["tinit_ratio"] * total_steps)
        tfinal = int(opts["tfinal_ratio"] * total_steps)
        if tinit + tfinal >= total_steps:
            raise UserError(
                f"adalora: tinit_ratio + tfinal_ratio must leave steps to prune in ({total_steps} steps in all)"
            )
        config = AdaLoraConfig(
            init_r=opts["init_r"],
            target_r=opts["target_r"],
            lora_alpha=opts["alpha"],
            lora_dropout=dropout,
            target_modules=_names(backbone),
            total_step=total_steps,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=opts["delta_t"],
            task_type="CAUSAL_LM",
        )
        peft = get_peft_model(model, config)
        return Built(peft, method, peft.get_nb_trainable_parameters()[0], callbacks=[AdaLoraStep()])
    if method == "ia3":
        config = IA3Config(
            target_modules=_names(backbone, opts["kinds"]),
            feedforward_modules=_names(backbone, opts["feedforward"]),
            task_type="CAUSAL_LM",
        )
        peft = get_peft_model(model, config)
        return Built(peft, method, peft.get_nb_trainable_parameters()[0])
    if method in SEARCHED:
        return _searched(method, backbone, opts)
    houlsby.add(model, backbone.layout, opts["size"], tuple(opts["kinds"]))
    return Built(model, method, houlsby.n_trainable(model), custom_save=houlsby.save)


def _searched(method: str, backbone: Backbone, opts: dict[str, Any]) -> Built:
    """A searched method's two phases: the returned Built only searches; its ``search`` returns the model to
    retrain. SSP needs a budget; Learned-Adapter takes one when given (else its DARTS rule decides)."""
    from fanlora import learned_adapter, ssp

    module = ssp if method == "ssp" else learned_adapter
    budget = opts["budget"]
    valid = isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1
    if not valid and (method == "ssp" or budget is not None):
        raise UserError(f"{method} needs a parameter budget (integer ≥ 1), got {budget!r}: experiments set FanLoRA's")

    def run_search(train: Any, dev: Any, params: Any, directory: Any, pad_id: int) -> Built:
        from pathlib import Path

        from fanlora.train import train_adapter

        where = Path(directory) / "search"
        chosen, minutes = module.search(backbone, opts, train, dev, params, where, pad_id, train_adapter)
        model = module.retrain_model(backbone, chosen, opts)
        return Built(
            model, method, module.trainable(model), custom_save=module.save, search_minutes=minutes,
            structure=[c.label for c in chosen],
        )  # fmt: skip

    return Built(backbone.model, method, 0, search=run_search)


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
    total = 0
    for name in modules:
        m = backbone.model.get_submodule(name)
        total += r * (m.in_features + m.out_features)
    return total


def lora_rank_for_budget(backbone: Backbone, modules: list[str], budget: int) -> int:
    """The rank (≥ 1) whose LoRA parameter count on ``modules`` is closest to ``budget``."""
    if not modules:
        raise UserError("no modules to give a rank to: the setting keeps none")
    per_rank = lora_params(backbone, modules, 1)
    return max(1, round(budget / per_rank))
