"""Stage d, defined once: fit a registered method on a task — on a setting's modules when the method trains on
one — and evaluate the trained model in memory, on one backbone load.

``fanlora finetune``, the demo and every cell of ``fanlora experiment`` call :func:`finetune`; none of them
trains or evaluates a task adapter any other way. It writes into ``out``:

- ``adapter/`` — the method's save (PEFT's ``save_pretrained`` or the method's own); a setting-trained
  adapter carries ``setting.json``, which serving and ``fanlora evaluate --adapter`` check;
- ``train_metrics.json`` — what training did (method, options, steps, best dev loss, trainable parameters,
  minutes, a searched method's structure);
- the evaluation's ``metrics.json``, ``items.jsonl``, ``predictions.jsonl`` (:mod:`fanlora.stages.evaluate`).

A folder that already holds its adapter and ``train_metrics.json`` is not trained again: the adapter is loaded
back onto the same backbone and evaluated. A run killed mid-training resumes from its last Trainer checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fanlora import atomic, methods
from fanlora.backbone import Backbone, from_config
from fanlora.config import Config
from fanlora.dist import is_main, say
from fanlora.evaluation.evaluate import training_examples
from fanlora.setting import Setting
from fanlora.stages.evaluate import run_evaluate
from fanlora.tasks import get_task
from fanlora.train import train_adapter

TRAIN_METRICS = "train_metrics.json"


@dataclass
class Plan:
    """What stage d fits: a registered method, its options (checked against the method's defaults) and, for a
    method that trains on a setting's modules or is sized to FanLoRA's budget, the setting."""

    method: str = "fanlora"
    options: dict[str, Any] = field(default_factory=dict)
    setting: Setting | None = None
    setting_path: str | None = None  # where the setting was read from (recorded, not read again)


@dataclass
class Finetuned:
    adapter: Path
    training: dict[str, Any]  # train_metrics.json
    metrics: dict[str, Any]  # the evaluation's metrics.json


def task_training_data(cfg: Config, backbone: Backbone) -> tuple[list[Any], list[Any]]:
    """The train and dev examples of ``cfg.finetune.task``, tokenised for training."""
    ft = cfg.finetune
    task = get_task(ft.task, ft.data)
    tok = backbone.tokenizer
    train = training_examples(tok, task, task.examples("train", ft.max_train_examples), ft.max_length)
    dev = training_examples(tok, task, task.examples("dev", ft.max_dev_examples), ft.max_length)
    return train, dev


def total_steps(train_params: Any, n_train: int) -> int:
    """Optimizer steps of a schedule (AdaLoRA's budget schedule needs the length before training starts)."""
    per_step = train_params.batch_size * train_params.grad_accum
    if train_params.max_steps > 0:
        return train_params.max_steps
    return math.ceil(train_params.epochs * math.ceil(n_train / per_step))


def options_for(cfg: Config, plan: Plan, backbone: Backbone) -> dict[str, Any]:
    """The plan's options completed: a setting-trained method takes ``finetune.lora``'s rank and alpha unless
    given; a searched method without a budget is sized to the setting's LoRA at that rank (FanLoRA's budget)."""
    method = methods.get(plan.method)
    options = dict(plan.options)
    lora = cfg.finetune.lora
    if method.needs_setting and "r" not in options:
        options.update(r=lora.r, alpha=options.get("alpha", lora.alpha))
    if method.searched and options.get("budget") is None and plan.setting is not None:
        options["budget"] = methods.lora_params(backbone, plan.setting.modules, options.get("r", lora.r))
    return options


def _train(cfg: Config, plan: Plan, backbone: Backbone, out: Path) -> tuple[Any, dict[str, Any]]:
    """Build the method on the backbone, run a searched method's search, train; the model and its record."""
    ft = cfg.finetune
    tok = backbone.tokenizer
    options = options_for(cfg, plan, backbone)
    train, dev = task_training_data(cfg, backbone)
    torch.manual_seed(ft.train.seed)
    steps = total_steps(ft.train, len(train))
    built = methods.build(plan.method, backbone, options, plan.setting, steps, ft.lora.dropout)
    if built.search is not None:  # ssp, learned-adapter: the search phase, timed apart from the retraining
        built = built.search(train, dev, ft.train, out, tok.pad_token_id)
    say(f"stage d: {ft.task}: {len(train)} train / {len(dev)} dev; {plan.method} {options} "
        f"({built.trainable} trainable parameters)")  # fmt: skip
    started = time.time()
    result = train_adapter(built.model, train, dev, ft.train, out, tok.pad_token_id, built.callbacks, built.custom_save)
    record = {
        "task": ft.task,
        "method": plan.method,
        "options": options,
        "trainable_parameters": built.trainable,
        "steps": result.steps,
        "best_dev_loss": result.best_eval_loss,
        "train_loss": result.train_loss,
        "train_minutes": round((time.time() - started) / 60, 2),
        "resumed": result.resumed_from is not None,
        "setting": plan.setting_path,
    }
    if built.structure:
        record.update(search_minutes=round(built.search_minutes, 2), structure=built.structure)
    if is_main():
        if plan.setting is not None and methods.get(plan.method).needs_setting:
            plan.setting.write(result.adapter_dir / "setting.json")  # travels with the adapter: serving checks it
        atomic.write_json(out / TRAIN_METRICS, record)
    say(f"stage d: adapter at {result.adapter_dir}")
    return built.model, record


def _done_before(out: Path) -> dict[str, Any] | None:
    """The record of a folder whose adapter was trained and saved before (``None`` if it was not)."""
    adapter, record = out / "adapter", out / TRAIN_METRICS
    if adapter.is_dir() and record.is_file() and methods.owner(adapter) is not None:
        data = atomic.read_json(record, f"delete {out} to train again")
        return data if isinstance(data, dict) else None
    return None


def finetune(
    cfg: Config,
    plan: Plan,
    out_dir: str | Path,
    backbone: Backbone | None = None,
    progress: bool = True,
) -> Finetuned:
    """Stage d on ``cfg.finetune.task``, then the trained model on the same task's
    ``cfg.evaluate.split`` — in memory, on the one ``backbone`` (loaded here if not given)."""
    out = Path(out_dir)
    backbone = backbone or from_config(cfg.backbone)
    record = _done_before(out)
    adapter = out / "adapter"
    if record is not None:
        say(f"stage d: done before, adapter at {adapter}")
        model = methods.load(backbone, adapter)
    else:
        model, record = _train(cfg, plan, backbone, out)
    started = time.time()
    metrics = run_evaluate(cfg, cfg.finetune.task, out, adapter=adapter, backbone=backbone, model=model.eval(),
                           progress=progress)  # fmt: skip
    record["eval_minutes"] = round((time.time() - started) / 60, 2)
    return Finetuned(adapter, record, metrics)
