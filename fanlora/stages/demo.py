"""The demo: all four stages on one backbone, then the task before/after, in one run directory:

run.json                    config that made the run
search/adapter/             stage a: gated LoRA on all modules (PEFT format) + search/metrics.json
scores.json, scores.csv     stage b: AB-score per (kind, layer)
setting.json, plots/        stage c: the FanLoRA setting and its figures
<task>/base/metrics.json    the bare backbone on the demo's task (+ predictions.jsonl, items.jsonl)
<task>/fanlora/adapter/     stage d: the task adapter (PEFT format, setting.json beside it)
<task>/fanlora/metrics.json stage d: its evaluation (+ predictions.jsonl, items.jsonl)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fanlora import atomic
from fanlora.backbone import from_config
from fanlora.config import Config
from fanlora.stages.evaluate import run_evaluate
from fanlora.stages.finetune import Plan, finetune
from fanlora.stages.score import run_score
from fanlora.stages.search import run_search
from fanlora.stages.select import run_select
from fanlora.train import environment


def run_demo(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """All four stages on one backbone, then COPA before/after: the end-to-end FanLoRA method."""
    start = time.time()
    run_dir = Path(run_dir)
    run_search(cfg, run_dir)
    run_score(cfg, run_dir)
    setting = run_select(run_dir / "scores.json", cfg.select.k_max, run_dir / "setting.json", run_dir / "plots")
    task = cfg.finetune.task
    base_dir, tuned_dir = run_dir / task / "base", run_dir / task / "fanlora"
    base, tuned = _cached_metrics(base_dir), _cached_metrics(tuned_dir)
    if base is None or tuned is None:
        backbone = from_config(cfg.backbone)  # one load: the bare model's evaluation, then stage d wraps it
        base = base or run_evaluate(cfg, task, base_dir, backbone=backbone)
        plan = Plan("fanlora", setting=setting, setting_path=str(run_dir / "setting.json"))
        tuned = tuned or finetune(cfg, plan, tuned_dir, backbone).metrics
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
