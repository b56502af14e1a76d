"""Stages a and c, the stability study and the demo as library calls; the CLI is a thin layer over these.

Every stage reads its inputs from, and writes its outputs into, a run directory:

    run.json                    config that made the run
    search/adapter/             stage a: gated LoRA on all modules (PEFT format) + search/metrics.json
    scores.json, scores.csv     stage b: AB-score per (kind, layer)
    setting.json, plots/        stage c: the FanLoRA setting and its figures
    <task>/base/metrics.json    the bare backbone on the demo's task (+ predictions.jsonl, items.jsonl)
    <task>/fanlora/adapter/     stage d: the task adapter (PEFT format, setting.json beside it)
    <task>/fanlora/metrics.json stage d: its evaluation (+ predictions.jsonl, items.jsonl)

Stage b's orchestration is :mod:`fanlora.scoring.stage`; stage d and evaluation are :mod:`fanlora.adapt`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fanlora import atomic, plots, rundir
from fanlora.adapt import run_evaluate, run_finetune
from fanlora.backbone import from_config
from fanlora.config import Config, load_config
from fanlora.data.instruct import for_search, read_conversations
from fanlora.dist import is_main, say
from fanlora.errors import UserError
from fanlora.gates import GatedLoRA
from fanlora.score_table import ScoreTable
from fanlora.scoring.compare import compare
from fanlora.scoring.stage import run_score
from fanlora.setting import Setting, file_sha256, select
from fanlora.train import environment, train_adapter


def run_search(cfg: Config, run_dir: str | Path) -> Path:
    """Stage a: LoRA (rank r0) on every module of every layer, fine-tuned on the instruction corpus."""
    out = Path(run_dir) / "search"
    adapter = out / "adapter"
    if (adapter / "adapter_config.json").is_file():
        say(f"stage a: done before, adapter at {adapter}")
        return adapter
    conversations = read_conversations(cfg.search.data.sources)  # bad data fails before the model loads
    torch.manual_seed(cfg.search.train.seed)
    backbone = from_config(cfg.backbone)
    data = for_search(cfg.search.data, backbone.tokenizer, conversations)
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


def run_select(
    scores_path: str | Path,
    k_max: int,
    setting_path: str | Path,
    plots_dir: str | Path | None = None,
    backbone: dict[str, Any] | None = None,
    budget: str | None = None,
    r1: int = 12,
    profile: str | None = None,
) -> Setting:
    """Stage c: top-k_max non-negative modules per layer → setting.json (+ figures).

    ``backbone`` (an identity) is the backbone the setting is meant for; scores of any other are refused.
    With ``budget`` (``params=N`` or ``latency=P%``) the modules are chosen by :mod:`fanlora.budget` instead,
    ``k_max`` then being an optional per-layer cap (None: no cap).
    """
    table = ScoreTable.read(scores_path)
    theirs = table.backbone.get("weights_digest")
    if backbone is not None and theirs != backbone.get("weights_digest"):
        raise UserError(
            f"{scores_path} scores backbone {table.backbone.get('source')} (weights {theirs}), not "
            f"{backbone.get('source')} (weights {backbone.get('weights_digest')}): score this backbone first"
        )
    source = {
        "scores": str(scores_path),
        "scores_sha256_16": file_sha256(scores_path)[:16],
        "method": table.method,
        "metric": table.metric,
    }
    if budget is None:
        setting = select(table, 2 if k_max is None else k_max, source)
        how = f"K_max={setting.k_max}"
    else:
        from fanlora.budget import budget_setting, parse_budget

        setting = budget_setting(table, budget, k_max, r1, profile, source)
        b = setting.source["budget"]
        cap = "no per-layer cap" if k_max is None else f"at most {k_max} per layer"
        how = f"budget {b['text']}, {cap}; predicted cost {parse_budget(budget).describe(b['predicted_cost'])}"
    setting.write(setting_path)
    if plots_dir is not None:
        plots.write_all(table, setting, plots_dir)
    say(f"stage c: {setting.n_modules} modules kept ({how}) → {setting_path}")
    return setting


def run_stability(cfg: Config, run_dir: str | Path, seeds: list[int]) -> Any:
    """Stage a + scoring under each seed (``<run_dir>/seed-<s>``), then their agreement (the paper's Table 4)."""
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"stability needs at least two different seeds, got {seeds}: e.g. --seeds 0 1 2")
    tables, names = [], []
    for seed in seeds:
        sub = Path(run_dir) / f"seed-{seed}"
        seeded = cfg.to_dict()
        seeded["search"]["train"]["seed"] = seed
        seeded = load_config(rundir.prepare(sub, seeded, ["backbone", "search", "score"]))
        say(f"stability: seed {seed} → {sub}")
        run_search(seeded, sub)
        tables.append(run_score(seeded, sub))
        names.append(f"seed {seed}")
    result = compare(tables, names, cfg.select.k_max)
    atomic.write_json(
        Path(run_dir) / "stability.json", {"seeds": seeds, "method": cfg.score.method, **result.to_dict()}
    )
    atomic.write_text(Path(run_dir) / "stability.md", result.markdown() + "\n")
    return result


def run_split_half(cfg: Config, run_dir: str | Path, seed: int) -> Any:
    """One stage-a run (``<run_dir>/seed-<s>``) scored on two disjoint halves of the val examples
    (``score.max_val_examples`` each: the first N, then the next N), then their agreement.

    Seeds differ in training *and* scoring noise; two halves of the val data under one adapter show the
    scoring noise alone, so the pair of numbers says which of the two limits stability.
    """
    n = cfg.score.max_val_examples
    if not n:
        raise UserError(
            "--split-half needs score.max_val_examples (each half's size), e.g. --set score.max_val_examples=16"
        )
    sub = Path(run_dir) / f"seed-{seed}"
    seeded = cfg.to_dict()
    seeded["search"]["train"]["seed"] = seed
    seeded["score"]["val_start"] = 0
    seeded = load_config(rundir.prepare(sub, seeded, ["backbone", "search", "score"]))
    say(f"split-half: stage a under seed {seed} → {sub}")
    run_search(seeded, sub)
    tables = []
    for half in (0, 1):
        halved = seeded.to_dict()
        halved["score"]["val_start"] = half * n
        where = sub / f"half-{half}"
        halved = load_config(rundir.prepare(where, halved, ["backbone", "search", "score"]))
        if not (where / "search").exists():
            (where / "search").symlink_to(Path("..") / "search")  # the same stage-a adapter
        say(f"split-half: val examples {half * n}..{half * n + n - 1} → {where}")
        tables.append(run_score(halved, where))
    result = compare(tables, ["val half 0", "val half 1"], cfg.select.k_max)
    record = {"seed": seed, "method": cfg.score.method, "examples_per_half": n, **result.to_dict()}
    atomic.write_json(Path(run_dir) / "split-half.json", record)
    atomic.write_text(Path(run_dir) / "split-half.md", result.markdown() + "\n")
    return result


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
        "environment": environment(),
    }
    atomic.write_json(run_dir / "summary.json", summary)
    return summary


def _cached_metrics(directory: Path) -> dict[str, Any] | None:
    path = directory / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None
