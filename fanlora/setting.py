"""The FanLoRA *setting*: which (kind, layer) modules carry LoRA. The one artifact every later stage uses.

Only the artifact: reading, writing, validating against a backbone, and the PEFT config it implies. How a
setting is chosen from scores (stage c) is :mod:`fanlora.stages.selection`. A setting records the backbone it was
made for; :meth:`Setting.validate` refuses any other backbone before a single weight is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fanlora import atomic
from fanlora.backbone import Backbone
from fanlora.errors import UserError

if TYPE_CHECKING:
    from peft import LoraConfig

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
    # SHA-256 of the file it was read from ("" when made in memory): runs record it, so the file is read once
    sha256: str = field(default="", compare=False, repr=False)

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
        data, digest = atomic.read_artifact_digest(path, SETTING_FORMAT, "setting", "fanlora select")
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
                sha256=digest,
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

    def fitted_to(self, backbone: Backbone) -> Setting:
        """This setting for ``backbone``: itself, validated — or, when ``backbone`` has random weights
        (``shape:…``) and the setting was made on another model, the same pattern mapped by layer fraction
        (layer ``t`` of ``n`` keeps what layer ``t·m // n`` of the setting's ``m`` kept). A setting found on random
        weights would mean nothing; a real setting's *pattern* on a model of another size is what a timing of
        that size needs. The mapped setting names its origin in ``source``, so no report can pass it off."""
        ident = backbone.identity
        if ident.get("weights") != "random" or self.backbone.get("weights_digest") == ident.get("weights_digest"):
            self.validate(backbone)
            return self
        layout, m = backbone.layout, self.num_layers
        missing = [k for k in self.kinds if k not in layout.paths]
        if missing:
            raise UserError(f"{ident.get('name')} has no module kind {', '.join(missing)} that the setting keeps")
        n = layout.num_layers
        mapped = Setting(
            backbone=dict(ident),
            layers_path=layout.layers_path,
            num_layers=n,
            module_paths={k: layout.paths[k] for k in self.kinds},
            k_max=self.k_max,
            kept={t: list(self.kept.get(t * m // n, [])) for t in range(n)},
            source={
                "rule": "mapped by layer fraction",
                "from_backbone": self.backbone.get("public_name") or self.backbone.get("name"),
                "from_layers": m,
                "from_modules": self.n_modules,
                "from_source": self.source,
            },
        )
        mapped.validate(backbone)
        return mapped

    def lora_config(self, r: int, alpha: int, dropout: float = 0.0) -> LoraConfig:
        """A PEFT config whose ``target_modules`` is exactly the selected full module names. (PEFT is imported
        here: reading a setting — the server does — needs neither PEFT nor the scores.)"""
        from peft import LoraConfig

        if not self.modules:
            raise UserError("the setting keeps no module: nothing to fine-tune (every score was negative)")
        return LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=self.modules, task_type="CAUSAL_LM"
        )
