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
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fanlora import atomic, methods
from fanlora.config import Config, load_config
from fanlora.errors import UserError
from fanlora.tasks import get_task, known_tasks

FORMAT = "fanlora-experiment/1"
VARIANT_KEYS = ("k_max", "r1", "scorer", "setting", "search_run", "set", "methods")
TOP_KEYS = (
    "name",
    "recipe",
    "out",
    "report",
    "set",
    "search_run",
    "methods",
    "tasks",
    "seeds",
    "variants",
    "task_set",
    "method_options",
    "budget",
    "reference",
)


def grid_tasks() -> list[str]:
    """Tasks a grid can run: those with a per-example score (MT-Bench needs a judge)."""
    return [n for n in known_tasks() if get_task(n).item_key is not None]


@dataclass
class Variant:
    name: str
    k_max: int | None = None
    r1: Any = None  # int, "budget" or None (finetune.lora.r)
    scorer: str = "ab-exact"
    setting: str = "top"  # top (the method) | inverse | random:SEED | fixed:KINDS — see setting.select_by_rule
    search_run: str | None = None
    set: list[str] = field(default_factory=list)
    methods: list[str] | None = None


@dataclass
class Experiment:
    name: str
    recipe: str = "demo"
    out: str = ""
    report: str = ""
    set: list[str] = field(default_factory=list)
    search_run: str = "runs/demo"
    methods: list[str] = field(default_factory=lambda: ["fanlora"])
    tasks: list[str] = field(default_factory=lambda: ["copa"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: dict[str, Variant] = field(default_factory=dict)
    task_set: dict[str, list[str]] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget: dict[str, int] = field(default_factory=lambda: {"k_max": 2, "r": 12})
    reference: str | None = None  # the variant FanLoRA's paired comparisons are made against (default: first)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    variant: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.task}__{self.method}__{self.variant}__s{self.seed}"


def _list(value: Any, where: str, typ: type) -> list[Any]:
    if not isinstance(value, list) or not value or not all(isinstance(v, typ) for v in value):
        raise UserError(f"experiment {where} must be a non-empty list of {typ.__name__}s, got {value!r}")
    return value


def parse(path: str | Path) -> Experiment:
    """Read and check an experiment config; every name is validated before anything runs."""
    from fanlora.scoring.study import check_method
    from fanlora.setting import check_rule

    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment config {path} does not exist: give a YAML file (see configs/experiments/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: an experiment config is a mapping of {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; valid keys are {', '.join(TOP_KEYS)}")
    exp = Experiment(name=str(raw.get("name") or path.stem))
    for key in ("recipe", "search_run", "out", "report", "reference"):
        if key in raw:
            setattr(exp, key, str(raw[key]))
    exp.out = exp.out or f"runs/experiments/{exp.name}"
    exp.report = exp.report or f"results/{exp.name}"
    if "set" in raw:
        exp.set = [str(s) for s in _list(raw["set"], "set", str)]
    if "methods" in raw:
        exp.methods = _list(raw["methods"], "methods", str)
    if "tasks" in raw:
        exp.tasks = _list(raw["tasks"], "tasks", str)
    if "seeds" in raw:
        exp.seeds = _list(raw["seeds"], "seeds", int)
    for m in exp.methods:
        if m not in methods.METHODS:
            raise UserError(f"{path}: unknown method {m!r}; methods are {', '.join(methods.METHODS)}")
    for t in exp.tasks:
        if t not in grid_tasks():
            valid = grid_tasks()
            raise UserError(
                f"{path}: task {t!r} cannot be in a grid; tasks are {', '.join(valid)} "
                "(mtbench needs a judge: use fanlora evaluate + fanlora judge)"
            )
    if "budget" in raw:
        budget = raw["budget"]
        if not isinstance(budget, dict) or set(budget) - {"k_max", "r"}:
            raise UserError(f"{path}: budget is a mapping with k_max and r (the reference FanLoRA run)")
        exp.budget = {**exp.budget, **budget}
    for t, overrides in (raw.get("task_set") or {}).items():
        if t not in exp.tasks:
            raise UserError(f"{path}: task_set names {t!r}, which is not in tasks ({', '.join(exp.tasks)})")
        exp.task_set[t] = [str(s) for s in _list(overrides, f"task_set.{t}", str)]
    for m, options in (raw.get("method_options") or {}).items():
        if not isinstance(options, dict):
            raise UserError(f"{path}: method_options.{m} must be a mapping of option: value")
        methods.check_options(m, options)
        exp.method_options[m] = options
    variants = raw.get("variants") or {"default": {}}
    if not isinstance(variants, dict):
        raise UserError(f"{path}: variants is a mapping name → options ({', '.join(VARIANT_KEYS)})")
    for name, spec in variants.items():
        spec = spec or {}
        if not isinstance(spec, dict):
            raise UserError(f"{path}: variant {name} must be a mapping of {', '.join(VARIANT_KEYS)}")
        bad = sorted(set(spec) - set(VARIANT_KEYS))
        if bad:
            raise UserError(f"{path}: variant {name} has unknown option {bad[0]!r}; valid: {', '.join(VARIANT_KEYS)}")
        v = Variant(name=str(name), **spec)
        if v.k_max is not None and (not isinstance(v.k_max, int) or isinstance(v.k_max, bool) or v.k_max < 1):
            raise UserError(f"{path}: variant {name}: k_max must be an integer >= 1, got {v.k_max!r}")
        if v.r1 is not None and v.r1 != "budget" and (not isinstance(v.r1, int) or v.r1 < 1):
            raise UserError(f"{path}: variant {name}: r1 must be a rank >= 1 or 'budget', got {v.r1!r}")
        check_method(v.scorer, 1)
        check_rule(v.setting)
        for m in v.methods or []:
            if m not in exp.methods:
                raise UserError(f"{path}: variant {name} names method {m!r}, not in methods ({', '.join(exp.methods)})")
        exp.variants[str(name)] = v
    if exp.reference is not None and exp.reference not in exp.variants:
        raise UserError(f"{path}: reference {exp.reference!r} is not a variant ({', '.join(exp.variants)})")
    for t in exp.tasks:  # every override must name a real config key, before anything runs
        for v in exp.variants.values():
            cell_config(exp, Cell(t, exp.methods[0], v.name, exp.seeds[0]))
    for t in exp.tasks:
        get_task(t)
    return exp


def cells(exp: Experiment) -> list[Cell]:
    out = []
    for v in exp.variants.values():
        for task in exp.tasks:
            for method in v.methods or exp.methods:
                for seed in exp.seeds:
                    out.append(Cell(task, method, v.name, seed))
    return out


def cell_config(exp: Experiment, cell: Cell) -> Config:
    variant = exp.variants[cell.variant]
    overrides = [
        *exp.set,
        *exp.task_set.get(cell.task, []),
        *variant.set,
        f"finetune.task={cell.task}",
        f"finetune.train.seed={cell.seed}",
    ]
    return load_config(exp.recipe, overrides)


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


def prepare_setting(exp: Experiment, variant: Variant) -> tuple[Path, int]:
    """The variant's setting file and FanLoRA rank (stage a and b run first if their run lacks them)."""
    from fanlora import pipeline, rundir
    from fanlora.backbone import load_backbone
    from fanlora.scoring import ScoreTable
    from fanlora.setting import select, select_by_rule

    out = Path(exp.out) / "settings" / f"{variant.name}.json"
    info = out.with_suffix(".rank.json")
    if out.is_file() and info.is_file():
        return out, json.loads(info.read_text())["r"]
    with _locked(Path(exp.out) / "settings" / ".lock"):
        if out.is_file() and info.is_file():
            return out, json.loads(info.read_text())["r"]
        cfg = _search_config(exp, variant)
        run = Path(variant.search_run or exp.search_run)
        if not (run / "run.json").is_file():
            rundir.prepare(run, cfg.to_dict(), ["backbone", "search", "score"])
        pipeline.run_search(cfg, run)
        pipeline.run_score(cfg, run, progress=False)
        table = ScoreTable.read(pipeline.scores_path(cfg, run))
        k_max = variant.k_max or cfg.select.k_max
        if variant.setting == "top":
            setting = pipeline.run_select(pipeline.scores_path(cfg, run), k_max, out)
        else:
            source = {"scores": str(pipeline.scores_path(cfg, run)), "method": variant.scorer}
            setting = select_by_rule(table, variant.setting, k_max, source)
            setting.write(out)
        rank = cfg.finetune.lora.r
        if isinstance(variant.r1, int):
            rank = variant.r1
        elif variant.r1 == "budget":
            backbone = load_backbone(cfg.backbone.name, dtype=cfg.backbone.dtype, module_map=cfg.backbone.module_map)
            reference = select(table, exp.budget["k_max"])
            budget = methods.lora_params(backbone, reference.modules, exp.budget["r"])
            rank = methods.lora_rank_for_budget(backbone, setting.modules, budget)
        atomic.write_json(
            info,
            {"r": rank, "k_max": k_max, "scorer": variant.scorer, "setting": variant.setting, "search_run": str(run)},
        )
        return out, rank


# --- one cell ----------------------------------------------------------------------------------------------
def total_steps(train_params: Any, n_train: int) -> int:
    per_step = train_params.batch_size * train_params.grad_accum
    if train_params.max_steps > 0:
        return train_params.max_steps
    return math.ceil(train_params.epochs * math.ceil(n_train / per_step))


def run_cell(exp: Experiment, cell: Cell, progress: bool = False) -> dict[str, Any]:
    """Train and evaluate one cell; its ``cell.json`` marks it done (and is returned on later calls)."""
    import torch

    from fanlora.pipeline import backbone_from, run_evaluate, task_training_data
    from fanlora.setting import Setting
    from fanlora.train import train_adapter

    directory = Path(exp.out) / "cells" / cell.id
    done = directory / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = cell_config(exp, cell)
    options = dict(exp.method_options.get(cell.method, {}))
    setting = None
    if cell.method == "fanlora":
        setting_path, rank = prepare_setting(exp, exp.variants[cell.variant])
        setting = Setting.read(setting_path)
        options.setdefault("r", rank)
        options.setdefault("alpha", 2 * options["r"])
    ft = cfg.finetune
    backbone = backbone_from(cfg)
    tok = backbone.tokenizer
    train, dev = task_training_data(cfg, backbone)
    torch.manual_seed(cell.seed)
    steps = total_steps(ft.train, len(train))
    built = methods.build(cell.method, backbone, options, setting, steps, ft.lora.dropout)
    started = time.time()
    result = train_adapter(
        built.model, train, dev, ft.train, directory, tok.pad_token_id, built.callbacks, built.custom_save
    )
    trained = time.time()
    metrics = run_evaluate(cfg, cell.task, directory, backbone=backbone, model=built.model.eval(), progress=progress)
    metric = get_task(cell.task).metric
    record = {
        **asdict(cell),
        "id": cell.id,
        "trainable_parameters": built.trainable,
        "options": options,
        "steps": result.steps,
        "best_dev_loss": result.best_eval_loss,
        "train_minutes": round((trained - started) / 60, 2),
        "eval_minutes": round((time.time() - trained) / 60, 2),
        "metric": metric,
        "value": metrics.get(metric),
        "n_test": metrics["n"],
        "gold_nll": metrics.get("gold_nll"),
        "n_loss": metrics.get("gold_nll_n", 0),
        "resumed": result.resumed_from is not None,
        "config": cfg.to_dict(),
    }
    atomic.write_json(done, record)
    shutil.rmtree(directory / "checkpoints", ignore_errors=True)  # the adapter is kept; checkpoints are not
    return record


# --- the grid ----------------------------------------------------------------------------------------------
def open_grid(exp: Experiment, resume: bool) -> Path:
    """Create the grid directory, or reopen it with --resume when it was made by this same config."""
    out = Path(exp.out)
    marker = out / "experiment.json"
    mine = {"format": FORMAT, "experiment": exp.to_dict()}
    if marker.is_file():
        theirs = json.loads(marker.read_text())
        if theirs != json.loads(json.dumps(mine)):
            raise UserError(
                f"{out} holds a grid made by another config: give another `out:` or delete {out} to start over"
            )
        if not resume:
            raise UserError(f"{out} already holds this grid: pass --resume to continue it")
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
    → results.md / results.json / cells.json (+ plots), through :mod:`fanlora.experiment_report`."""
    from fanlora import experiment_report as report_

    records = []
    for cell in cells(exp):
        path = Path(exp.out) / "cells" / cell.id / "cell.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
    rows = report_.rows_of(records)
    total = sum(r["train_minutes"] + r["eval_minutes"] for r in records)
    summary = {
        "name": exp.name,
        "cells_done": len(records),
        "cells": len(cells(exp)),
        "grid_minutes": round(total, 1),
        "rows": rows,
        "comparisons": report_.paired(exp, records),
        "experiment": exp.to_dict(),
    }
    report = Path(exp.report)
    atomic.write_json(report / "results.json", summary)
    atomic.write_text(report / "results.md", report_.markdown(exp, summary))
    atomic.write_json(report / "cells.json", records)
    if len(exp.variants) > 1 and rows:
        report_.plot(exp, rows, report)
    return summary
