"""Recipes: nested dataclasses read from YAML, with ``section.key=value`` overrides from the command line.

Defaults are the paper's (``configs/paper.yaml`` spells them out); ``configs/demo.yaml`` shrinks the sizes to
fit a 2-core CPU. Unknown keys are refused by name, so a typo in a recipe never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from fanlora.errors import UserError

MODES = ("auto", "loglik", "generate")  # evaluate.mode
MC_FORMATS = ("clean", "lm-eval")  # evaluate.mc_format
DECODINGS = ("greedy", "sampling", "beam")  # evaluate.decoding


def flag(
    name: str,
    help: str | Callable[[], str],
    type: Any = None,
    choices: tuple[str, ...] | None = None,
    deprecated: tuple[str, ...] = (),
    per_command: bool = False,
) -> dict:
    """Field metadata: this config value is also a command-line flag. Its default, range and config key are
    the field's own; the CLI's option and help text are generated from them (:func:`cli_flags`). ``deprecated``:
    old spellings still accepted, each with a warning naming the new one. ``per_command``: the value chooses
    which output one command writes, not what the run is (another scorer on the same run is the same run)."""
    return {"flag": name, "help": help, "type": type, "choices": choices, "deprecated": deprecated,
            "per_command": per_command}  # fmt: skip


def per_command_keys() -> tuple[str, ...]:
    """``section.key`` of every field flagged ``per_command`` (:mod:`fanlora.stages.rundir` ignores them when it
    compares a run's stored config with a new command's)."""
    return tuple(
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(get_type_hints(Config)[section.name])
        if f.metadata.get("per_command")
    )


@dataclass
class BackboneConfig:
    name: str = "embedded"  # 'embedded', an HF id, a local directory or a .gguf file
    dtype: str = "float32"  # weights dtype; scoring stays float32: bf16 rounding is as large as one module's effect
    module_map: Any = None  # e.g. "Q=self_attn.q_proj,..." when the architecture is not recognised


#: Stage d's LoRA rank r1 (the paper's 12; stage a's r0 defaults to it too): every default rank of 12 reads this.
R1 = 12


@dataclass
class LoraParams:
    r: int = R1
    alpha: int = 2 * R1
    dropout: float = 0.0


@dataclass
class TrainParams:
    learning_rate: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    eval_steps: int = 200
    patience: int = 10
    bf16: bool = False  # bf16 autocast where the hardware has bf16 (AVX512-BF16/AMX, recent GPUs), else fp32
    seed: int = 42
    logging_steps: int = 10
    eval_batch_size: int = 16


@dataclass
class DataParams:
    sources: list[str] = field(
        default_factory=lambda: ["bundled:instruct/gpteacher_codegen", "bundled:instruct/gpteacher_roleplay"]
    )
    max_length: int = 1024
    val_fraction: float = 0.01
    split_seed: int = 0
    max_train_examples: Any = None  # int or null: cap on train examples after the split


@dataclass
class SearchConfig:
    data: DataParams = field(default_factory=DataParams)
    lora: LoraParams = field(default_factory=LoraParams)
    train: TrainParams = field(default_factory=TrainParams)


@dataclass
class ScoreConfig:
    method: str = field(
        default="ab-exact", metadata=flag("--scorer", "stage-b scorer", deprecated=("--method",), per_command=True)
    )
    max_val_examples: Any = None  # int or null: score on the first N val examples (after val_start)
    val_start: int = 0  # skip the first val examples: two disjoint halves give a split-half stability check
    batch_size: int = 8
    shapley_budget: int = field(default=8, metadata=flag("--budget", "shapley: permutations sampled (each ≈ N·L/2 "
                                                                     "passes' work)", per_command=True))  # fmt: skip
    seed: int = field(default=0, metadata=flag("--seed", "shapley: seed of the sampled permutations", per_command=True))
    memory_limit_gb: Any = field(
        default=None, metadata=flag("--memory-limit-gb", "cache budget in GiB (null: a quarter of RAM / GPU memory)",
                                    float, per_command=True),
    )  # fmt: skip


@dataclass
class SelectConfig:
    k_max: int = 2


@dataclass
class FinetuneConfig:
    task: str = "copa"
    max_length: int = 1024
    lora: LoraParams = field(default_factory=LoraParams)
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=10.0))
    max_train_examples: Any = None
    max_dev_examples: Any = None  # int or null: early stopping on the first N dev examples
    data: Any = None  # {split: source}: replace a task split's data (local JSONL or an HF dataset name)


@dataclass
class EvaluateConfig:
    split: str = "test"
    limit: Any = None  # int or null: evaluate the first N examples
    batch_size: int = field(default=16, metadata=flag("--batch-size", "examples per batch"))
    mode: str = field(default="auto", metadata=flag("--mode", "multiple choice: loglik (what auto means) or "
                                                              "generate", choices=MODES))  # fmt: skip
    mc_format: str = field(default="clean", metadata=flag(
        "--mc-format", "multiple-choice text: clean (one space before each choice) or lm-eval (stock "
        "lm-evaluation-harness 0.4, item for item)", choices=MC_FORMATS))  # fmt: skip
    decoding: str = field(default="greedy", metadata=flag("--decoding", "the paper's is beam (num_beams 3)",
                                                          choices=DECODINGS))  # fmt: skip
    num_beams: int = field(default=3, metadata=flag("--num-beams", "beam search width (the paper's)"))
    temperature: float = field(default=0.7, metadata=flag("--temperature", "sampling temperature"))
    top_p: float = field(default=0.95, metadata=flag("--top-p", "sampling nucleus"))
    max_new_tokens: Any = field(default=None, metadata=flag("--max-new-tokens", "generation budget (null: the "
                                                                                "task's)", int))  # fmt: skip
    seed: int = field(default=0, metadata=flag("--sample-seed", "sampling seed"))
    max_length: int = 2048  # prompt + generation; longer prompts are cut from the left
    data: Any = None  # {split: source}, as finetune.data
    accuracy: bool = True  # score the first `limit` examples with the task's metric
    gold_loss: bool = False  # also the held-out loss of the gold answers (items.jsonl), over `loss_limit`
    loss_limit: Any = None  # int or null (the whole split)


@dataclass
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config {where or 'root'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"unknown config key {where + '.' if where else ''}{unknown[0]}: "
            f"valid keys here are {', '.join(sorted(names))}"
        )
    obj = cls()
    for key, value in data.items():
        typ = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(typ):
            if value is not None and not isinstance(value, dict):
                raise UserError(f"config {path} is a section, not a value: set one of its keys, e.g. {path}.<key>=…")
            base = dataclasses.asdict(getattr(obj, key))
            base.update(value or {})
            value = _build(typ, base, path)
        elif typ is int and not (isinstance(value, int) and not isinstance(value, bool)):
            raise UserError(f"config {path} must be an integer, got {value!r}")
        elif typ is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UserError(f"config {path} must be a number, got {value!r}")
            value = float(value)
        elif typ is bool and not isinstance(value, bool):
            raise UserError(f"config {path} must be true or false, got {value!r}")
        elif typ is str and not isinstance(value, str):
            raise UserError(f"config {path} must be a string, got {value!r}")
        setattr(obj, key, value)
    return obj


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: v >= low


def _optional_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# Ranges of values by key name (a key means the same in every section). Checked once, on the built config,
# so a recipe, a --set override and a CLI flag are all held to the same rules.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": (_at_least(1), "≥ 1"),
    "eval_batch_size": (_at_least(1), "≥ 1"),
    "grad_accum": (_at_least(1), "≥ 1"),
    "eval_steps": (_at_least(1), "≥ 1"),
    "logging_steps": (_at_least(1), "≥ 1"),
    "patience": (_at_least(0), "≥ 0"),
    "r": (_at_least(1), "≥ 1"),
    "alpha": (_at_least(1), "≥ 1"),
    "max_length": (_at_least(1), "≥ 1"),
    "num_beams": (_at_least(1), "≥ 1"),
    "k_max": (_at_least(1), "≥ 1"),
    "learning_rate": (lambda v: 0 < v < 1, "in (0, 1)"),
    "epochs": (lambda v: v > 0, "> 0"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (use epochs) or ≥ 1"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, "≥ 0"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "temperature": (lambda v: v > 0, "> 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "mc_format": (lambda v: v in MC_FORMATS, " or ".join(MC_FORMATS)),
    "limit": (_optional_count, "null or ≥ 1"),
    "max_new_tokens": (_optional_count, "null or ≥ 1"),
    "loss_limit": (_optional_count, "null or ≥ 1"),
    "max_train_examples": (_optional_count, "null or ≥ 1"),
    "max_dev_examples": (_optional_count, "null or ≥ 1"),
    "max_val_examples": (_optional_count, "null or ≥ 1"),
    "val_start": (_at_least(0), "≥ 0"),
    "memory_limit_gb": (lambda v: isinstance(v, int | float) and math.isfinite(v) and v > 0, "> 0"),
}


def check_values(obj: Any, where: str = "") -> None:
    """Refuse out-of-range values (negative sizes, NaN rates, …) with the key, the value and the range."""
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_values(value, path)
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config {path} is {value}: give a finite number")
        rule = _RANGES.get(f.name)
        if rule is not None and value is not None and not rule[0](value):
            raise UserError(f"config {path} is {value!r}: it must be {rule[1]}")


def recipe_path(name: str) -> Path:
    """A recipe by path, or by name among the bundled ones (``demo`` → ``fanlora/configs/demo.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = Path(str(resources.files("fanlora") / "configs")) / f"{name}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted(p.stem for p in bundled.parent.glob("*.yaml"))
    raise UserError(f"config {name} not found: give a YAML file or one of {', '.join(known)}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value: write e.g. search.train.max_steps=20")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {key}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(
                f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); quote it"
            ) from None
    return data


MAX_YAML_BYTES = 1_000_000  # a recipe is a few KB
MAX_YAML_VALUES = 100_000  # values after alias expansion: "billion laughs" recipes expand ×9 per level


def _expanded(value: Any, budget: list[int]) -> None:
    """Count the values of ``value`` as json would write them (a YAML alias counts every time it is used)."""
    budget[0] -= 1
    if budget[0] < 0:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _expanded(k, budget)
            _expanded(v, budget)
    elif isinstance(value, list):
        for v in value:
            _expanded(v, budget)


def read_yaml(path: Path) -> Any:
    """A YAML file, bounded in size and in alias expansion; every fault one UserError naming the file."""
    if path.stat().st_size > MAX_YAML_BYTES:
        raise UserError(f"{path} is over {MAX_YAML_BYTES} bytes: not a recipe")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise UserError(f"{path} is nested too deeply") from None
    budget = [MAX_YAML_VALUES]
    _expanded(data, budget)
    if budget[0] < 0:
        raise UserError(f"{path} expands to more than {MAX_YAML_VALUES:,} values (nested YAML aliases?): write it out")
    return data


def load_config(source: str | dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← recipe (a file, a bundled name, or a dict) ← overrides."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = recipe_path(source)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: a recipe is a mapping of sections (backbone, search, score, …)")
    data = apply_overrides(data, list(overrides or []))
    config = _build(Config, data, "")
    check_values(config)
    return config


@dataclass
class CliFlag:
    """A config value offered as a command-line flag: what the parser adds and which key it overrides."""

    section: str
    key: str
    flag: str
    type: Any
    choices: tuple[str, ...] | None
    help: str
    deprecated: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return f"config.{self.section}.{self.key}"


def cli_flags(section: str) -> list[CliFlag]:
    """The flags of a config section, their help text made from the field's help, default, range and key."""
    cls = get_type_hints(Config)[section]
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("flag") and f.metadata
        if not meta:
            continue
        text = meta["help"]() if callable(meta["help"]) else meta["help"]
        default = "null" if f.default is None else f.default
        rule = _RANGES.get(f.name)
        extra = f", {rule[1]}" if rule and not meta["choices"] else ""
        typ = meta["type"] or (hints[f.name] if hints[f.name] in (int, float, str) else str)
        help_text = f"{text} (default {default}{extra}; config {section}.{f.name})".replace("%", "%%")
        out.append(CliFlag(section, f.name, meta["flag"], typ, meta["choices"], help_text, meta.get("deprecated", ())))
    return out


def flag_overrides(values: dict[str, Any]) -> list[str]:
    """``section.key=value`` overrides (YAML) for the config flags given on the command line (by ``dest``)."""
    out = []
    for dest, value in values.items():
        if dest.startswith("config.") and value is not None:
            literal = yaml.safe_dump(value).splitlines()[0]  # YAML's own spelling round-trips (1e-09, 'yes')
            out.append(f"{dest.removeprefix('config.')}={literal}")
    return out
