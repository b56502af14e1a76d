"""The four FanLoRA stages as library calls; the CLI and the demo are thin wrappers around these.

Every stage reads its inputs from, and writes its outputs into, a run directory:

    run.json                    config that made the run
    search/adapter/             stage a: gated LoRA on all modules (PEFT format) + search/metrics.json
    scores.json, scores.csv     stage b: AB-score per (kind, layer)
    setting.json, plots/        stage c: the FanLoRA setting and its figures
    <task>/adapter/             stage d: the task adapter (PEFT format)
    <task>/metrics.json         stage d: evaluation (and <task>/predictions.jsonl)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from fanlora import atomic, plots
from fanlora.backbone import Backbone, load_backbone
from fanlora.config import Config
from fanlora.data.instruct import InstructionData, load_instruction_data, read_conversations
from fanlora.errors import UserError
from fanlora.evaluate import evaluate_mc, training_examples
from fanlora.gates import GatedLoRA
from fanlora.scoring import ScoreTable, ab_scores
from fanlora.setting import Setting, file_sha256, select
from fanlora.tasks import get_task
from fanlora.train import train_adapter


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_main():
        print(message, flush=True)


def backbone_from(cfg: Config) -> Backbone:
    b = cfg.backbone
    return load_backbone(b.name, dtype=b.dtype, module_map=b.module_map)


def instruction_data(
    cfg: Config, backbone: Backbone, conversations: list | None = None, val_only: bool = False
) -> InstructionData:
    d = cfg.search.data
    return load_instruction_data(
        backbone.tokenizer,
        d.sources,
        max_length=d.max_length,
        val_fraction=d.val_fraction,
        split_seed=d.split_seed,
        max_records=0 if val_only else d.max_train_examples,
        conversations=conversations,
    )


def run_search(cfg: Config, run_dir: str | Path) -> Path:
    """Stage a: LoRA (rank r0) on every module of every layer, fine-tuned on the instruction corpus."""
    out = Path(run_dir) / "search"
    adapter = out / "adapter"
    if (adapter / "adapter_config.json").is_file():
        say(f"stage a: done before, adapter at {adapter}")
        return adapter
    conversations = read_conversations(cfg.search.data.sources)  # bad data fails before the model loads
    torch.manual_seed(cfg.search.train.seed)
    backbone = backbone_from(cfg)
    data = instruction_data(cfg, backbone, conversations)
    say(
        f"stage a: {len(data.train)} train / {len(data.val)} val examples; LoRA r={cfg.search.lora.r} on "
        f"{len(backbone.layout.all_modules())} modules"
    )
    lora = cfg.search.lora
    gated = GatedLoRA.create(backbone.model, backbone.layout, lora.r, lora.alpha, lora.dropout)
    start = time.time()
    result = train_adapter(gated.model, data.train, data.val, cfg.search.train, out, backbone.tokenizer.pad_token_id)
    if is_main():
        atomic.write_json(
            out / "metrics.json",
            {
                "steps": result.steps,
                "best_eval_loss": result.best_eval_loss,
                "train_loss": result.train_loss,
                "minutes": (time.time() - start) / 60,
                "n_train": len(data.train),
                "n_val": len(data.val),
                "resumed_from": result.resumed_from,
                "backbone": backbone.identity,
            },
        )
    say(f"stage a: adapter at {result.adapter_dir} (best val loss {result.best_eval_loss})")
    return result.adapter_dir


def run_score(cfg: Config, run_dir: str | Path, progress: bool = True) -> ScoreTable:
    """Stage b: exact AB-score of every (kind, layer) on the val split, resumable."""
    run_dir = Path(run_dir)
    json_path, csv_path = run_dir / "scores.json", run_dir / "scores.csv"
    if json_path.is_file():
        say(f"stage b: done before, scores at {json_path}")
        return ScoreTable.read(json_path)
    adapter = run_dir / "search" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"no stage-a adapter in {adapter}: run `fanlora search --run-dir {run_dir}` first")
    backbone = backbone_from(cfg)
    if backbone.model.dtype != torch.float32:
        say("warning: scoring in a reduced precision; one module moves the loss by ~1e-4, so prefer float32")
    data = instruction_data(cfg, backbone, val_only=True)
    val = data.val[: cfg.score.max_val_examples] if cfg.score.max_val_examples else data.val
    gated = GatedLoRA.load(backbone.model, backbone.layout, adapter)
    adapter_sha = file_sha256(adapter / "adapter_model.safetensors")[:16]
    val_fp = InstructionData(train=[], val=val, sources=data.sources).fingerprint()
    n_tokens = sum(e.n_response for e in val)
    say(
        f"stage b: AB-score of {len(gated.keys)} modules on {len(val)} val examples ({n_tokens} response tokens), "
        f"{2 + 2 * len(gated.keys)} passes"
    )
    header = {"backbone": backbone.identity["weights_digest"], "adapter": adapter_sha, "val": val_fp}
    partial = run_dir / "scores.partial.jsonl"
    start = time.time()
    table = ab_scores(gated, val, backbone.tokenizer.pad_token_id, cfg.score.batch_size, partial, header, progress)
    table.backbone = backbone.identity
    table.meta = {
        "adapter": str(adapter),
        "adapter_sha256_16": adapter_sha,
        "val": {
            "sources": data.sources,
            "n_examples": len(val),
            "n_response_tokens": n_tokens,
            "fingerprint": val_fp,
            "split_seed": cfg.search.data.split_seed,
        },
        "minutes": (time.time() - start) / 60,
    }
    table.write(json_path, csv_path)
    partial.unlink(missing_ok=True)
    say(f"stage b: scores at {json_path} and {csv_path}")
    return table


def run_select(
    scores_path: str | Path, k_max: int, setting_path: str | Path, plots_dir: str | Path | None = None
) -> Setting:
    """Stage c: top-k_max non-negative modules per layer → setting.json (+ figures)."""
    table = ScoreTable.read(scores_path)
    source = {
        "scores": str(scores_path),
        "scores_sha256_16": file_sha256(scores_path)[:16],
        "method": table.method,
        "metric": table.metric,
    }
    setting = select(table, k_max, source)
    setting.write(setting_path)
    if plots_dir is not None:
        plots.write_all(table, setting, plots_dir)
    say(f"stage c: {setting.n_modules} modules kept (K_max={k_max}) → {setting_path}")
    return setting


def run_evaluate(
    cfg: Config,
    task_name: str,
    out_dir: str | Path,
    adapter: str | Path | None = None,
    backbone: Backbone | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the base model or base + adapter on a task split; write metrics.json + predictions.jsonl."""
    task = get_task(task_name)
    examples = task.examples(cfg.evaluate.split, cfg.evaluate.limit)
    backbone = backbone or backbone_from(cfg)
    model = backbone.model
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
        setting_file = Path(adapter) / "setting.json"
        if setting_file.is_file():
            Setting.read(setting_file).validate(backbone)
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    result = evaluate_mc(model, backbone.tokenizer, examples, cfg.evaluate.batch_size, progress)
    metrics = {
        "task": task_name,
        "split": cfg.evaluate.split,
        "adapter": str(adapter) if adapter else None,
        **result.metrics,
    }
    out = Path(out_dir)
    atomic.write_jsonl(out / "predictions.jsonl", result.predictions)
    atomic.write_json(out / "metrics.json", metrics)
    say(
        f"evaluate: {task_name}/{cfg.evaluate.split} acc={metrics['acc']:.4f} acc_norm={metrics['acc_norm']:.4f} "
        f"(n={metrics['n']}) → {out / 'metrics.json'}"
    )
    return metrics


def run_finetune(cfg: Config, setting_path: str | Path, out_dir: str | Path) -> Path:
    """Stage d: fresh LoRA (rank r1) on exactly the setting's modules, trained on the task's train split."""
    out = Path(out_dir)
    adapter = out / "adapter"
    if (adapter / "adapter_config.json").is_file():
        say(f"stage d: done before, adapter at {adapter}")
        return adapter
    setting = Setting.read(setting_path)
    backbone = backbone_from(cfg)
    setting.validate(backbone)
    ft = cfg.finetune
    task = get_task(ft.task)
    tok = backbone.tokenizer
    train = training_examples(tok, task.examples("train", ft.max_train_examples), ft.max_length)
    dev = training_examples(tok, task.examples("dev"), ft.max_length)
    torch.manual_seed(ft.train.seed)
    from peft import get_peft_model

    model = get_peft_model(backbone.model, setting.lora_config(ft.lora.r, ft.lora.alpha, ft.lora.dropout))
    say(
        f"stage d: {ft.task}: {len(train)} train / {len(dev)} dev; LoRA r={ft.lora.r} on {setting.n_modules} modules "
        f"({model.get_nb_trainable_parameters()[0]} trainable parameters)"
    )
    result = train_adapter(model, train, dev, ft.train, out, tok.pad_token_id)
    if is_main():
        setting.write(result.adapter_dir / "setting.json")  # travels with the adapter: serving checks it
        atomic.write_json(
            out / "train_metrics.json",
            {
                "task": ft.task,
                "steps": result.steps,
                "best_dev_loss": result.best_eval_loss,
                "train_loss": result.train_loss,
                "trainable_parameters": model.get_nb_trainable_parameters()[0],
                "setting": str(setting_path),
            },
        )
    say(f"stage d: adapter at {result.adapter_dir}")
    return result.adapter_dir


def run_demo(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """All four stages on one backbone, then COPA before/after: the end-to-end FanLoRA method."""
    start = time.time()
    run_dir = Path(run_dir)
    run_search(cfg, run_dir)
    run_score(cfg, run_dir)
    setting = run_select(run_dir / "scores.json", cfg.select.k_max, run_dir / "setting.json", run_dir / "plots")
    task = cfg.finetune.task
    base_dir, tuned_dir = run_dir / task / "base", run_dir / task / "fanlora"
    base = _cached_metrics(base_dir) or run_evaluate(cfg, task, base_dir)
    adapter = run_finetune(cfg, run_dir / "setting.json", tuned_dir)
    tuned = _cached_metrics(tuned_dir) or run_evaluate(cfg, task, tuned_dir, adapter=adapter)
    summary = {
        "run_dir": str(run_dir),
        "minutes": round((time.time() - start) / 60, 2),
        "modules_kept": setting.n_modules,
        "task": task,
        "split": cfg.evaluate.split,
        f"{task}_acc_base": base["acc"],
        f"{task}_acc_fanlora": tuned["acc"],
    }
    atomic.write_json(run_dir / "summary.json", summary)
    return summary


def _cached_metrics(directory: Path) -> dict[str, Any] | None:
    path = directory / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None
