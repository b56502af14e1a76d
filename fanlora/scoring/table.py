"""The scores of every (kind, layer): what each scorer returns and what `fanlora select` reads.

One table format for every method (``ab-exact``, ``ab-first-order``, ``sensitivity``, ``shapley``): each row
has a ``score`` (higher = more worth keeping) plus method-specific columns — for the AB-score the two
ablation performances, for Shapley the standard error of the estimate — so any scorer feeds stage c.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fanlora import atomic
from fanlora.backbone import module_key
from fanlora.errors import UserError

SCORES_FORMAT = "fanlora-scores/1"
METRIC = "neg_mean_response_token_loss"
_TOP_LEVEL = {"format", "method", "metric", "backbone", "num_layers", "kinds", "s_all", "s_null", "scores"}


@dataclass
class ScoreTable:
    """Scores of one backbone + stage-a adapter on one validation set, by one method."""

    backbone: dict[str, Any]
    kinds: list[str]
    num_layers: int
    module_names: dict[str, str]  # "Q.3" → full module name
    values: dict[str, float]  # "Q.3" → score
    columns: dict[str, dict[str, float]] = field(default_factory=dict)  # "Q.3" → extra per-row columns
    method: str = "ab-exact"
    metric: str = METRIC
    s_all: float | None = None  # S(M_all), S(M_null) where the method measures them
    s_null: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, kind: str, layer: int) -> float:
        return self.values[module_key(kind, layer)]

    @property
    def keys(self) -> list[str]:
        """Layer-major "kind.layer" keys: one fixed order for every comparison between tables."""
        return [module_key(k, layer) for layer in range(self.num_layers) for k in self.kinds]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for layer in range(self.num_layers):
            for kind in self.kinds:
                key = module_key(kind, layer)
                out.append(
                    {
                        "kind": kind,
                        "layer": layer,
                        "module": self.module_names[key],
                        "score": self.values[key],
                        **self.columns.get(key, {}),
                    }
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCORES_FORMAT,
            "method": self.method,
            "metric": self.metric,
            "backbone": self.backbone,
            "num_layers": self.num_layers,
            "kinds": self.kinds,
            "s_all": self.s_all,
            "s_null": self.s_null,
            **self.meta,
            "scores": self.rows(),
        }

    def write(self, json_path: str | Path, csv_path: str | Path | None = None) -> None:
        atomic.write_json(json_path, self.to_dict())
        if csv_path is None:
            return
        extra = sorted({c for cols in self.columns.values() for c in cols})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["layer", "kind", "module", "score", *extra])
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: row.get(k, "") for k in writer.fieldnames})
        atomic.write_text(csv_path, buf.getvalue())

    @classmethod
    def read(cls, path: str | Path) -> ScoreTable:
        data = atomic.read_artifact(path, SCORES_FORMAT, "scores", "fanlora score")
        values, names, columns = {}, {}, {}
        try:
            for row in data["scores"]:
                key = f"{row['kind']}.{row['layer']}"
                values[key] = float(row["score"])
                names[key] = row["module"]
                columns[key] = {k: v for k, v in row.items() if k not in {"kind", "layer", "module", "score"}}
            table = cls(
                backbone=data["backbone"],
                kinds=list(data["kinds"]),
                num_layers=int(data["num_layers"]),
                module_names=names,
                values=values,
                columns=columns,
                method=data.get("method", "ab-exact"),
                metric=data.get("metric", ""),
                s_all=data.get("s_all"),
                s_null=data.get("s_null"),
                meta={k: v for k, v in data.items() if k not in _TOP_LEVEL},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} is a damaged scores file ({exc!r}): re-run `fanlora score`") from None
        missing = [k for k in table.keys if k not in values]
        if missing:
            raise UserError(f"{path} lacks scores for {', '.join(missing[:3])}: re-run `fanlora score`")
        return table
