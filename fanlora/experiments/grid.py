"""``fanlora experiment CONFIG.yaml``: a grid of fine-tuning runs (methods × tasks × seeds × variants).

Each cell trains one method on one task under one seed and one variant, evaluates it, and leaves
``cell.json`` (trainable parameters, steps, wall time, the metric); a cell with ``cell.json`` is never
re-run, and a cell killed mid-training resumes from its last Trainer checkpoint. ``--shard I/N`` runs every
N-th cell, so two processes can share the grid. After each invocation the finished cells are aggregated
(median over seeds, with min and max) into ``results.md``/``results.json`` and, for grids with more than
one variant, a plot per task.

A variant changes how FanLoRA's setting is made or trained: ``k_max``, ``r1`` (a rank, or ``budget``: the
rank whose parameter count matches the experiment's ``budget``), ``scorer`` (the stage-b method whose scores
select the setting), ``search_run`` (another stage-a run: another instruction corpus or backbone, made if
missing), ``set`` (config overrides for every method in the variant) and ``methods`` (which methods run in
it). Settings are prepared once per variant under ``<out>/settings/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fanlora import atomic, methods
from fanlora.backbone import from_config
from fanlora.config import Config, load_config
from fanlora.errors import UserError
from fanlora.experiments import plots
from fanlora.experiments import report as report_
from fanlora.experiments.config import FORMAT, Cell, Experiment, Variant, cell_config, cells
from fanlora.scoring import ScoreTable, scorers
from fanlora.setting import Setting
from fanlora.stages import rundir
from fanlora.stages import score as stage
from fanlora.stages.finetune import Plan, finetune
from fanlora.stages.search import run_search
from fanlora.stages.select import run_select
from fanlora.stages.selection import select, select_by_rule
from fanlora.tasks import get_task


# --- settings ----------------------------------------------------------------------------------------------
def _search_config(exp: Experiment, variant: Variant) -> Config:
    return load_config(exp.recipe, [*exp.set, *variant.set, f"score.method={variant.scorer}"])


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _rank(info: Path) -> int:
    data = atomic.read_json(info, f"delete {info} and its setting to prepare them again")
    if not isinstance(data, dict) or not isinstance(data.get("r"), int):
        raise UserError(f"{info} holds no rank: delete it and its setting to prepare them again")
    return data["r"]


def _scored(cfg: Config, run: Path) -> ScoreTable:
    """The score table of ``run`` under ``cfg`` (stages a and b run first if the run lacks them)."""
    if not (run / "run.json").is_file():
        rundir.prepare(run, cfg.to_dict(), ["backbone", "search", "score"])
    if scorers.get(cfg.score.method).needs_stage_a:  # a scorer of the bare backbone needs no stage a
        run_search(cfg, run)
    stage.run_score(cfg, run, progress=False)
    return ScoreTable.read(stage.scores_path(cfg, run))


def reference_budget(exp: Experiment, backbone: Any) -> int:
    """The trainable parameters every ``r1: budget`` variant is sized to: LoRA of rank ``budget.r`` on the
    top-``budget.k_max`` setting of the experiment's own search run and default scorer.

    Always that one run, never the variant's: a variant with another scorer or stage a would otherwise be
    sized to its own setting and miss the budget the others share.
    """
    cfg = _search_config(exp, Variant(name="budget"))
    table = _scored(cfg, Path(exp.search_run))
    return methods.lora_params(backbone, select(table, exp.budget["k_max"]).modules, exp.budget["r"])


def prepare_setting(exp: Experiment, variant: Variant) -> tuple[Path, int]:
    """The variant's setting file and FanLoRA rank (stage a and b run first if their run lacks them)."""

    out = Path(exp.out) / "settings" / f"{variant.name}.json"
    info = out.with_suffix(".rank.json")
    if out.is_file() and info.is_file():
        return out, _rank(info)
    with _locked(Path(exp.out) / "settings" / ".lock"):
        if out.is_file() and info.is_file():
            return out, _rank(info)
        cfg = _search_config(exp, variant)
        run = Path(variant.search_run or exp.search_run)
        table = _scored(cfg, run)
        k_max = variant.k_max or cfg.select.k_max
        if variant.setting == "top":
            setting = run_select(stage.scores_path(cfg, run), k_max, out)
        elif variant.setting.startswith("budget:"):  # k_max only caps a layer if the variant sets it
            r1 = variant.r1 if isinstance(variant.r1, int) else cfg.finetune.lora.r
            budget = variant.setting.partition(":")[2]
            setting = run_select(stage.scores_path(cfg, run), variant.k_max, out, None, None, budget, r1)
        else:
            source = {"scores": str(stage.scores_path(cfg, run)), "method": variant.scorer}
            setting = select_by_rule(table, variant.setting, k_max, source)
            setting.write(out)
        rank = cfg.finetune.lora.r
        if isinstance(variant.r1, int):
            rank = variant.r1
        elif variant.r1 == "budget":
            backbone = from_config(cfg.backbone)
            rank = methods.lora_rank_for_budget(backbone, setting.modules, reference_budget(exp, backbone))
        atomic.write_json(
            info,
            {"r": rank, "k_max": k_max, "scorer": variant.scorer, "setting": variant.setting, "search_run": str(run)},
        )
        return out, rank


# --- one cell ----------------------------------------------------------------------------------------------
def run_cell(exp: Experiment, cell: Cell, progress: bool = False) -> dict[str, Any]:
    """Stage d (:func:`fanlora.stages.finetune.finetune`) for one cell; its ``cell.json`` marks it done (and is
    returned on later calls). The grid only decides what the cell trains: its setting, rank and budget."""

    directory = Path(exp.out) / "cells" / cell.id
    done = directory / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = cell_config(exp, cell)
    plan = Plan(cell.method, dict(exp.method_options.get(cell.method, {})))
    if methods.get(cell.method).needs_setting:
        setting_path, rank = prepare_setting(exp, exp.variants[cell.variant])
        plan.setting, plan.setting_path = Setting.read(setting_path), str(setting_path)
        plan.options.setdefault("r", rank)
        plan.options.setdefault("alpha", 2 * plan.options["r"])
    backbone = from_config(cfg.backbone)
    if methods.get(cell.method).searched and not plan.options.get("budget"):  # FanLoRA's trainable parameters
        reference, rank = prepare_setting(exp, exp.variants[exp.reference or next(iter(exp.variants))])
        plan.options["budget"] = methods.lora_params(backbone, Setting.read(reference).modules, rank)
    fitted = finetune(cfg, plan, directory, backbone, progress=progress)
    trained = fitted.training
    metric = get_task(cell.task).metric
    record = {
        **asdict(cell),
        "id": cell.id,
        "trainable_parameters": trained["trainable_parameters"],
        "options": trained["options"],
        "steps": trained["steps"],
        "best_dev_loss": trained["best_dev_loss"],
        "train_minutes": trained["train_minutes"],
        "eval_minutes": trained["eval_minutes"],
        "metric": metric,
        "value": fitted.metrics.get(metric),
        "n_test": fitted.metrics["n"],
        "gold_nll": fitted.metrics.get("gold_nll"),
        "n_loss": fitted.metrics.get("gold_nll_n", 0),
        "resumed": trained["resumed"],
        **{k: trained[k] for k in ("search_minutes", "structure") if k in trained},
        "config": cfg.to_dict(),
    }
    atomic.write_json(done, record)
    shutil.rmtree(directory / "checkpoints", ignore_errors=True)  # the adapter is kept; checkpoints are not
    shutil.rmtree(directory / "search" / "checkpoints", ignore_errors=True)
    return record


# --- the grid ----------------------------------------------------------------------------------------------
def _only_adds_variants(theirs: dict, mine: dict) -> bool:
    """Whether ``mine`` is ``theirs`` plus new variants: every finished cell still means what it meant."""
    if theirs.get("format") != mine["format"] or not isinstance(theirs.get("experiment"), dict):
        return False
    old, new = dict(theirs["experiment"]), dict(mine["experiment"])
    old_variants, new_variants = old.pop("variants", None), new.pop("variants")
    if old != new or not isinstance(old_variants, dict):
        return False
    return all(new_variants.get(name) == spec for name, spec in old_variants.items())


def open_grid(exp: Experiment, resume: bool) -> Path:
    """Create the grid directory, or reopen it with --resume when it was made by this same config — or by this
    config less some of its variants (a challenger added to a running study keeps the cells already done)."""
    out = Path(exp.out)
    marker = out / "experiment.json"
    mine = json.loads(json.dumps({"format": FORMAT, "experiment": exp.to_dict()}))
    if marker.is_file():
        theirs = atomic.read_json(marker, f"delete {out} to start the grid over")
        if theirs != mine and not _only_adds_variants(theirs, mine):
            raise UserError(
                f"{out} holds a grid made by another config: give another `out:` or delete {out} to start over"
            )
        if not resume:
            raise UserError(f"{out} already holds this grid: pass --resume to continue it")
        if theirs != mine:  # it grew by variants: the marker says what the grid is now
            atomic.write_json(marker, mine)
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not an experiment grid: give another `out:` in the config")
    else:
        atomic.write_json(marker, mine)
    return out


def run(
    exp: Experiment,
    resume: bool = False,
    shard: tuple[int, int] = (0, 1),
    say: Any = print,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Run this process's share of the grid's cells (those matching ``only``, glob patterns on cell ids)."""
    todo = cells(exp)
    if only:
        todo = [c for c in todo if any(fnmatch.fnmatchcase(c.id, pattern) for pattern in only)]
        if not todo:
            raise UserError(f"no cell id matches {' '.join(only)}: ids look like copa__fanlora__default__s0")
    open_grid(exp, resume or shard[1] > 1)  # shards of one grid start side by side
    index, count = shard
    mine = [c for i, c in enumerate(todo) if i % count == index]
    say(f"experiment {exp.name}: {len(todo)} cells, {len(mine)} in this process → {exp.out}")
    for i, cell in enumerate(mine, 1):
        done = (Path(exp.out) / "cells" / cell.id / "cell.json").is_file()
        say(f"[{i}/{len(mine)}] {cell.id}{' (done before)' if done else ''}")
        record = run_cell(exp, cell)
        shown = [f"{record['metric']}={record['value']:.4f}"] if record["value"] is not None else []
        if record.get("gold_nll") is not None:
            shown.append(f"gold_nll={record['gold_nll']:.4f}")
        say(f"    {' '.join(shown)} params={record['trainable_parameters']} train {record['train_minutes']} min")
    return aggregate(exp)


def aggregate(exp: Experiment) -> dict[str, Any]:
    """Summaries per (task, variant, method) of the finished cells and FanLoRA's paired comparisons
    → results.md / results.json / cells.json (+ plots), through :mod:`fanlora.experiments.report`."""
    records = []
    for cell in cells(exp):
        path = Path(exp.out) / "cells" / cell.id / "cell.json"
        if path.is_file():
            records.append(atomic.read_json(path, f"delete {path.parent} to run that cell again"))
    rows = report_.rows_of(records)
    total = sum(r["train_minutes"] + r["eval_minutes"] for r in records)
    summary = {
        "name": exp.name,
        "cells_done": len(records),
        "cells": len(cells(exp)),
        "grid_minutes": round(total, 1),
        "rows": rows,
        "comparisons": report_.paired(exp, records),
        "pool_comparisons": report_.pooled(exp, records),
        "structures": report_.structures(exp, records),
        "seeds": report_.seed_effects(exp, records),
        "experiment": exp.to_dict(),
    }
    report = Path(exp.report)
    atomic.write_json(report / "results.json", summary)
    notes = (report / "notes.md").read_text() if (report / "notes.md").is_file() else ""
    atomic.write_text(report / "results.md", report_.markdown(exp, summary, notes))
    atomic.write_json(report / "cells.json", records)
    if len(exp.variants) > 1 and rows:
        plots.plot(exp, rows, report)
        plots.loss_plot(exp, records, report)
    return summary
