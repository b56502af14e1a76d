"""Evaluation as a library call: a model (the bare backbone, a saved adapter, or one trained in memory) on a task.

``run_evaluate`` writes, per task and split, ``metrics.json``, ``predictions.jsonl`` (the task's metric on the
first ``evaluate.limit`` examples) and ``items.jsonl`` (per example: its score and, with
``evaluate.gold_loss``, the held-out loss of its gold answer — what paired comparisons use).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fanlora import atomic, methods
from fanlora.backbone import Backbone, from_config
from fanlora.config import MODES, Config
from fanlora.dist import say
from fanlora.errors import UserError
from fanlora.evaluation.evaluate import (
    evaluate_generation,
    evaluate_mc,
    evaluate_mc_generate,
    gold_losses,
    gold_losses_from_choices,
)
from fanlora.generate import Decoding
from fanlora.tasks import get_task


def decoding_of(cfg: Config) -> Decoding:
    ev = cfg.evaluate
    return Decoding(ev.decoding, ev.num_beams, ev.temperature, ev.top_p, ev.max_new_tokens, ev.seed).check()


def load_for_eval(cfg: Config, adapter: str | Path | None, backbone: Backbone | None = None) -> tuple[Any, Backbone]:
    """The backbone, with the adapter on top when given (its setting checked against the backbone first)."""
    backbone = backbone or from_config(cfg.backbone)
    model = backbone.model
    if adapter is not None:  # whichever method saved it (the registry recognises its files)
        model = methods.load(backbone, adapter)
    model.eval()
    return model, backbone


def run_evaluate(
    cfg: Config,
    task_name: str,
    out_dir: str | Path,
    adapter: str | Path | None = None,
    backbone: Backbone | None = None,
    progress: bool = True,
    model: Any = None,
    checked: bool = False,
) -> dict[str, Any]:
    """Evaluate the base model or base + adapter on a task split.

    Writes metrics.json, predictions.jsonl (the task's metric on the first ``evaluate.limit`` examples) and
    items.jsonl (one line per example: its score and, with ``evaluate.gold_loss``, the held-out loss of its
    gold answer — the per-item outcomes that paired comparisons use).
    """
    ev = cfg.evaluate
    if ev.mode not in MODES:
        raise UserError(f"unknown evaluate mode {ev.mode!r}: use one of {', '.join(MODES)}")
    task = get_task(task_name, ev.data)
    decoding = decoding_of(cfg)
    if task.kind == "generate" and ev.mode == "loglik":
        raise UserError(f"task {task_name} is scored by generation only: drop --mode loglik")
    if not ev.accuracy and not ev.gold_loss:
        raise UserError("evaluate.accuracy and evaluate.gold_loss are both off: nothing to evaluate")
    examples = task.examples(ev.split, ev.limit) if ev.accuracy else []
    if not checked:  # run_evaluate_many checks every task's examples once, before the model loads
        task.check(examples)
    loss_examples = task.examples(ev.split, ev.loss_limit) if ev.gold_loss else []
    if model is None:
        model, backbone = load_for_eval(cfg, adapter, backbone)
    tok = backbone.tokenizer
    started = time.time()
    metrics: dict[str, Any] = {"task": task_name, "split": ev.split, "adapter": str(adapter) if adapter else None}
    predictions: list[dict[str, Any]] = []
    if examples:
        result = _score_task(cfg, task, model, tok, examples, decoding, progress)
        if task.kind == "mc":
            metrics["mc_format"] = ev.mc_format
        metrics.update(result.metrics)
        predictions = result.predictions
    losses = _gold_losses(cfg, task, model, tok, loss_examples, predictions, progress)
    if losses:
        per_item = [v for v, _ in losses]
        metrics["gold_nll"] = sum(per_item) / len(per_item)
        metrics["gold_nll_tokens"] = sum(v * n for v, n in losses) / max(1, sum(n for _, n in losses))
        metrics["gold_nll_n"] = len(losses)
        metrics.setdefault("n", 0)
    metrics["seconds"] = round(time.time() - started, 1)
    out = Path(out_dir)
    if predictions:
        atomic.write_jsonl(out / "predictions.jsonl", predictions)
    atomic.write_jsonl(out / "items.jsonl", item_rows(task, predictions, loss_examples, losses, examples))
    atomic.write_json(out / "metrics.json", metrics)
    say(f"evaluate: {task_name}/{ev.split} {_headline(task, metrics)} (n={metrics['n']}) → {out / 'metrics.json'}")
    return metrics


def _gold_losses(cfg: Config, task: Any, model: Any, tok: Any, examples: list[Any], predictions, progress: bool):
    """Per loss example (nll, tokens): taken from the choices' scores when they hold it, else one more pass."""
    ev = cfg.evaluate
    if not examples:
        return []
    if task.kind == "mc" and ev.mode != "generate" and ev.mc_format == "clean" and predictions:
        reused = gold_losses_from_choices(tok, task, examples, predictions, ev.max_length)
        if reused is not None:
            return reused
    return gold_losses(model, tok, task, examples, ev.batch_size, ev.max_length, progress)


def _score_task(cfg: Config, task: Any, model: Any, tok: Any, examples: list[Any], decoding: Decoding, progress: bool):
    ev = cfg.evaluate
    if task.kind == "generate":
        return evaluate_generation(model, tok, task, examples, decoding, ev.batch_size, ev.max_length, progress)
    examples = task.formatted(examples, ev.mc_format)
    if ev.mode == "generate":
        return evaluate_mc_generate(model, tok, examples, decoding, ev.batch_size, ev.max_length, progress)
    return evaluate_mc(model, tok, examples, ev.batch_size, progress)


def item_rows(
    task: Any,
    predictions: list[dict[str, Any]],
    loss_examples: list[Any],
    losses: list[tuple[float, int]],
    examples: Any = (),
) -> list[dict[str, Any]]:
    """One row per example id: ``value`` (the task's per-item score) and/or ``gold_nll`` + ``gold_tokens``,
    and its ``cluster`` (what a paired comparison resamples, :meth:`fanlora.tasks.base.Task.cluster_key`)."""
    rows: dict[str, dict[str, Any]] = {}
    clusters = {str(ex.id): task.cluster_key(ex) for ex in [*examples, *loss_examples]}
    for p in predictions:
        value = task.item_value(p)
        if value is not None:  # MT-Bench answers have no per-item score until a judge gives one
            rows.setdefault(str(p["id"]), {"id": str(p["id"])})["value"] = value
    for ex, (nll, n) in zip(loss_examples, losses, strict=True):
        rows.setdefault(str(ex.id), {"id": str(ex.id)}).update({"gold_nll": nll, "gold_tokens": n})
    for row in rows.values():
        if row["id"] in clusters:
            row["cluster"] = clusters[row["id"]]
    return list(rows.values())


def _headline(task: Any, metrics: dict[str, Any]) -> str:
    """The task's headline metric, the others it shows and the gold loss when computed, as ``key=value`` pairs."""
    parts = []
    for key in (task.metric, *task.shown, "gold_nll"):
        value = metrics.get(key)
        if isinstance(value, float):
            parts.append(f"{key}={value:.4f}")
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{key}={value}")
    return " ".join(parts)


def run_evaluate_many(
    cfg: Config, tasks: list[str], outs: list[Path], adapter: str | Path | None = None
) -> list[dict[str, Any]]:
    """Several tasks on one loaded model (the backbone and adapter are loaded once)."""
    for name in tasks:  # every task and its examples are checked before the model loads
        task = get_task(name, cfg.evaluate.data)
        if cfg.evaluate.accuracy:
            task.check(task.examples(cfg.evaluate.split, cfg.evaluate.limit))
    model, backbone = load_for_eval(cfg, adapter)
    return [
        run_evaluate(cfg, name, out, adapter=adapter, backbone=backbone, model=model, checked=True)
        for name, out in zip(tasks, outs, strict=True)
    ]
