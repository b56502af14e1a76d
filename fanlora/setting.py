"""The FanLoRA *setting*: which (kind, layer) modules carry LoRA. The one artifact every later stage uses.

Selection (stage c) keeps at most ``k_max`` modules per layer, highest score first, and never a module whose
score is negative — so a layer may keep fewer than ``k_max``, even none. A setting records the backbone it was
made for; :meth:`Setting.validate` refuses any other backbone before a single weight is trained.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import LoraConfig

from fanlora import atomic
from fanlora.backbone import KINDS, Backbone
from fanlora.errors import UserError
from fanlora.scoring.table import ScoreTable

SETTING_FORMAT = "fanlora-setting/1"


@dataclass
class Setting:
    backbone: dict[str, Any]
    layers_path: str
    num_layers: int
    module_paths: dict[str, str]  # kind → path inside a layer
    k_max: int
    kept: dict[int, list[str]]  # layer → kinds kept, best first
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return list(self.module_paths)

    @property
    def modules(self) -> list[str]:
        """Full module names, layer-major — exactly PEFT's ``target_modules``."""
        return [
            f"{self.layers_path}.{layer}.{self.module_paths[k]}"
            for layer in range(self.num_layers)
            for k in self.kept.get(layer, [])
        ]

    @property
    def n_modules(self) -> int:
        return sum(len(v) for v in self.kept.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SETTING_FORMAT,
            "backbone": self.backbone,
            "num_layers": self.num_layers,
            "layers_path": self.layers_path,
            "module_kinds": self.kinds,
            "module_paths": self.module_paths,
            "k_max": self.k_max,
            "n_modules": self.n_modules,
            "kept": {str(layer): self.kept.get(layer, []) for layer in range(self.num_layers)},
            "modules": self.modules,
            "source": self.source,
        }

    def write(self, path: str | Path) -> Path:
        return atomic.write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> Setting:
        data = atomic.read_artifact(path, SETTING_FORMAT, "setting", "fanlora select")
        try:
            paths = dict(data["module_paths"])
            kept: dict[int, list[str]] = {}
            for layer, kinds in data["kept"].items():
                for kind in kinds:
                    if kind not in paths:
                        raise UserError(
                            f"{path}: layer {layer} keeps unknown module kind {kind!r}; "
                            f"this setting's kinds are {', '.join(paths)}"
                        )
                kept[int(layer)] = list(kinds)
            return cls(
                backbone=dict(data["backbone"]),
                layers_path=str(data["layers_path"]),
                num_layers=int(data["num_layers"]),
                module_paths=paths,
                k_max=int(data["k_max"]),
                kept=kept,
                source=data.get("source", {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{path} is a damaged setting file ({exc!r}): re-run `fanlora select`") from None

    def validate(self, backbone: Backbone) -> None:
        """Refuse a backbone this setting was not made for (layer count, module names, weights)."""
        layout, ident = backbone.layout, backbone.identity
        if self.num_layers != layout.num_layers:
            raise UserError(
                f"the setting is for {self.num_layers} layers but {ident.get('name')} has "
                f"{layout.num_layers}: select a setting from scores of this backbone"
            )
        ours = [f"{self.layers_path}.N.{p}" for p in self.module_paths.values()]
        theirs = [f"{layout.layers_path}.N.{layout.paths[k]}" for k in self.module_paths if k in layout.paths]
        if ours != theirs:
            raise UserError(
                f"the setting's modules ({', '.join(ours)}) do not match {ident.get('name')} "
                f"({', '.join(theirs) or 'none of those kinds'}): "
                "select a setting from scores of this backbone"
            )
        for key in ("model_type", "hidden_size", "weights_digest"):
            if self.backbone.get(key) != ident.get(key):
                raise UserError(
                    f"the setting was made for backbone {self.backbone.get('name')!r} "
                    f"({key}={self.backbone.get(key)}) but the model is {ident.get('name')!r} "
                    f"({key}={ident.get(key)}): select a setting from scores of this backbone"
                )
        names = {n for n, _ in backbone.model.named_modules()}
        missing = [m for m in self.modules if m not in names]
        if missing:
            raise UserError(f"the model has no module {missing[0]}: this setting belongs to another backbone")

    def lora_config(self, r: int, alpha: int, dropout: float = 0.0) -> LoraConfig:
        """A PEFT config whose ``target_modules`` is exactly the selected full module names."""
        if not self.modules:
            raise UserError("the setting keeps no module: nothing to fine-tune (every score was negative)")
        return LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=self.modules, task_type="CAUSAL_LM"
        )


def _check_k_max(k_max: Any) -> None:
    if not isinstance(k_max, int) or isinstance(k_max, bool) or k_max < 1:
        raise UserError(f"k_max must be an integer >= 1, got {k_max!r}: the paper uses 2")


def from_table(table: ScoreTable, kept: dict[int, list[str]], k_max: int, source: dict[str, Any] | None) -> Setting:
    """A setting keeping ``kept`` (layer → kinds) on the backbone and module layout the scores describe."""
    unknown = [k for k in table.kinds if k not in KINDS]
    if unknown:
        raise UserError(f"the scores name unknown module kind {unknown[0]!r}: kinds are {', '.join(KINDS)}")
    paths: dict[str, str] = {}
    layers_path = None
    for kind in table.kinds:
        full = table.module_names[f"{kind}.0"]
        prefix, rest = full.split(".0.", 1) if ".0." in full else (None, None)
        if prefix is None:
            raise UserError(f"cannot read the layer list from module name {full!r} in the scores")
        layers_path = prefix
        paths[kind] = rest
    return Setting(
        backbone=table.backbone,
        layers_path=str(layers_path),
        num_layers=table.num_layers,
        module_paths=paths,
        k_max=k_max,
        kept=kept,
        source=dict(source or {}),
    )


RULES = ("top", "inverse", "all", "random:SEED", "fixed:KINDS", "budget:UNIT=VALUE")


def check_rule(rule: Any) -> None:
    """Refuse a malformed setting rule before any work (the kinds of ``fixed:`` are checked against scores).

    ``budget:`` rules are made by :func:`fanlora.stages.budget.budget_setting` (the experiment runner dispatches them);
    their budget text is checked there.
    """
    kind, _, arg = str(rule).partition(":")
    ok = (kind in ("top", "inverse", "all") and not arg) or (kind == "random" and arg.isdigit())
    ok = ok or (kind in ("fixed", "budget") and bool(arg))
    if not isinstance(rule, str) or not ok:
        raise UserError(f"unknown setting rule {rule!r}: use one of {', '.join(RULES)}")


def select_by_rule(table: ScoreTable, rule: str, k_max: int = 2, source: dict[str, Any] | None = None) -> Setting:
    """Settings to compare the AB-score's choice with, all of ``k_max`` modules per layer:

    - ``top``: the method itself (:func:`select`);
    - ``inverse``: the ``k_max`` *lowest*-scoring kinds of every layer, whatever their sign — if it does as
      well as ``top``, the score carries no information;
    - ``random:SEED``: ``k_max`` kinds per layer drawn uniformly, independently per layer;
    - ``fixed:Q,V`` (any kinds): the same kinds in every layer, as LoRA is used without a search;
    - ``all``: every module of every layer (LoRA as PEFT users apply it to all linear layers).
    """
    _check_k_max(k_max)
    kind, _, arg = rule.partition(":")
    source = {**(source or {}), "rule": rule}
    if kind == "top" and not arg:
        return select(table, k_max, source)
    layers = range(table.num_layers)
    if kind == "inverse" and not arg:
        kept = {n: sorted(table.kinds, key=lambda k: (table.score(k, n), table.kinds.index(k)))[:k_max] for n in layers}
    elif kind == "random" and arg.isdigit():
        rng = random.Random(int(arg))
        kept = {n: rng.sample(table.kinds, min(k_max, len(table.kinds))) for n in layers}
    elif kind == "all" and not arg:
        kept = {n: list(table.kinds) for n in layers}
        k_max = len(table.kinds)
    elif kind == "fixed" and arg:
        kinds = [k.strip() for k in arg.split(",")]
        bad = [k for k in kinds if k not in table.kinds]
        if bad:
            raise UserError(f"setting rule {rule!r}: unknown kind {bad[0]!r}; kinds are {', '.join(table.kinds)}")
        kept = {n: list(kinds) for n in layers}
        k_max = len(kinds)
    else:
        check_rule(rule)
        raise AssertionError(rule)
    return from_table(table, kept, k_max, source)


def select(table: ScoreTable, k_max: int = 2, source: dict[str, Any] | None = None) -> Setting:
    """Stage c: per layer, the top ``k_max`` non-negative scores (ties: paper kind order)."""
    _check_k_max(k_max)
    kept: dict[int, list[str]] = {}
    for layer in range(table.num_layers):
        ranked = sorted(table.kinds, key=lambda k: (-table.score(k, layer), table.kinds.index(k)))
        kept[layer] = [k for k in ranked if table.score(k, layer) >= 0][:k_max]
    setting = from_table(table, kept, k_max, source)
    if setting.n_modules == 0:
        raise UserError(
            "every score is negative, so no module can be kept: check that stage a trained "
            "(its val loss should fall) and score on more validation data"
        )
    return setting


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
