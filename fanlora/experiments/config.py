"""What an experiment grid is: its YAML (methods × tasks × seeds × variants), checked whole before anything
runs, and the cells it expands to. Running the cells is :mod:`fanlora.experiments.grid`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fanlora import methods
from fanlora.config import R1, Config, load_config, read_yaml
from fanlora.errors import UserError
from fanlora.scoring import scorers
from fanlora.stages.selection import check_rule
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
    setting: str = "top"  # top | inverse | all | random:SEED | fixed:KINDS | budget:UNIT=VALUE (setting.RULES)
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
    budget: dict[str, int] = field(default_factory=lambda: {"k_max": 2, "r": R1})
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


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"experiment config {path} does not exist: give a YAML file (see configs/experiments/)")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: an experiment config is a mapping of {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; valid keys are {', '.join(TOP_KEYS)}")
    return raw


def _parse_grid(path: Path, raw: dict[str, Any], exp: Experiment) -> None:
    """Methods, tasks, seeds, budget, per-task overrides and method options."""
    if "set" in raw:
        exp.set = [str(s) for s in _list(raw["set"], "set", str)]
    if "methods" in raw:
        exp.methods = _list(raw["methods"], "methods", str)
    if "tasks" in raw:
        exp.tasks = _list(raw["tasks"], "tasks", str)
    if "seeds" in raw:
        exp.seeds = _list(raw["seeds"], "seeds", int)
    for m in exp.methods:
        if m not in methods.names():
            raise UserError(f"{path}: unknown method {m!r}; methods are {', '.join(methods.names())}")
    for t in exp.tasks:
        if t not in grid_tasks():
            raise UserError(
                f"{path}: task {t!r} cannot be in a grid; tasks are {', '.join(grid_tasks())} "
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


def _parse_variant(path: Path, name: Any, spec: Any, exp: Experiment) -> Variant:
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
    scorers.get(v.scorer)
    check_rule(v.setting)
    if str(v.setting).startswith("budget:"):
        from fanlora.stages.budget import parse_budget

        try:
            parse_budget(v.setting.partition(":")[2])
        except UserError as exc:
            raise UserError(f"{path}: variant {name}: {exc}") from None
    for m in v.methods or []:
        if m not in exp.methods:
            raise UserError(f"{path}: variant {name} names method {m!r}, not in methods ({', '.join(exp.methods)})")
    return v


def parse(path: str | Path) -> Experiment:
    """Read and check an experiment config; every name is validated before anything runs."""
    path = Path(path)
    raw = _read(path)
    exp = Experiment(name=str(raw.get("name") or path.stem))
    for key in ("recipe", "search_run", "out", "report", "reference"):
        if key in raw:
            setattr(exp, key, str(raw[key]))
    exp.out = exp.out or f"runs/experiments/{exp.name}"
    exp.report = exp.report or f"results/{exp.name}"
    _parse_grid(path, raw, exp)
    variants = raw.get("variants") or {"default": {}}
    if not isinstance(variants, dict):
        raise UserError(f"{path}: variants is a mapping name → options ({', '.join(VARIANT_KEYS)})")
    for name, spec in variants.items():
        exp.variants[str(name)] = _parse_variant(path, name, spec, exp)
    if exp.reference is not None and exp.reference not in exp.variants:
        raise UserError(f"{path}: reference {exp.reference!r} is not a variant ({', '.join(exp.variants)})")
    for t in exp.tasks:  # every override must name a real config key, before anything runs
        for v in exp.variants.values():
            cell_config(exp, Cell(t, exp.methods[0], v.name, exp.seeds[0]))
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
