"""PNG figures: score heatmap (paper Fig. 5), setting heatmap (Fig. 6), modules kept per kind (Fig. 1)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fanlora import atomic
from fanlora.backbone import KIND_NAMES
from fanlora.scoring.table import ScoreTable
from fanlora.setting import Setting


def _save(fig: plt.Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic.write_bytes(path, buf.getvalue())


def score_heatmap(table: ScoreTable, path: str | Path) -> Path:
    grid = np.array([[table.score(k, layer) for k in table.kinds] for layer in range(table.num_layers)])
    bound = float(np.abs(grid).max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(table.kinds), 1.0 + 0.22 * table.num_layers))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(table.kinds)), table.kinds)
    ax.set_yticks(range(table.num_layers))
    ax.set_ylabel("layer")
    ax.set_title("AB-score per module (red = helps)")
    fig.colorbar(im, ax=ax, shrink=0.6)
    return _save(fig, Path(path))


def setting_heatmap(setting: Setting, path: str | Path) -> Path:
    kinds = setting.kinds
    grid = np.array([[k in setting.kept.get(layer, []) for k in kinds] for layer in range(setting.num_layers)], float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(kinds), 1.0 + 0.22 * setting.num_layers))
    ax.imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(setting.num_layers))
    ax.set_ylabel("layer")
    ax.set_title(f"FanLoRA setting: {setting.n_modules} modules, K_max={setting.k_max}")
    return _save(fig, Path(path))


def kind_distribution(setting: Setting, path: str | Path) -> Path:
    kinds = setting.kinds
    counts = [sum(k in v for v in setting.kept.values()) for k in kinds]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([f"{k}\n{KIND_NAMES.get(k, '')}" for k in kinds], counts, color="tab:green")
    ax.set_ylabel("layers keeping it")
    ax.set_title(f"Modules kept per kind ({setting.n_modules} of {setting.num_layers * len(kinds)})")
    return _save(fig, Path(path))


def write_all(table: ScoreTable, setting: Setting, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    return [
        score_heatmap(table, out / "scores_heatmap.png"),
        setting_heatmap(setting, out / "setting_heatmap.png"),
        kind_distribution(setting, out / "kinds_distribution.png"),
    ]
