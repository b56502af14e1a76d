"""How much two score tables agree: the paper's Table 4 (Spearman ρ between seeds) and more.

Rank correlations say whether two studies order the modules alike; what a user finally cares about is
whether they *select* alike, so the overlap of the K_max settings each table yields is reported too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from fanlora.errors import UserError
from fanlora.scoring.table import ScoreTable
from fanlora.stages.selection import select


@dataclass
class Comparison:
    names: list[str]
    spearman: list[list[float]]
    kendall: list[list[float]]
    overlap: list[list[float]]  # |A ∩ B| / |A ∪ B| of the selected module sets
    common: list[list[int]]  # |A ∩ B|
    selected: list[int]
    k_max: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def markdown(self) -> str:
        out = []
        for title, matrix, fmt in (
            ("Spearman ρ of the scores", self.spearman, "{:.3f}"),
            ("Kendall τ of the scores", self.kendall, "{:.3f}"),
            (f"Overlap of the selected settings (K_max={self.k_max}; Jaccard)", self.overlap, "{:.3f}"),
        ):
            out += [f"### {title}", "", "| | " + " | ".join(self.names) + " |", "|---" * (len(self.names) + 1) + "|"]
            out += [
                f"| {n} | " + " | ".join(fmt.format(v) for v in row) + " |"
                for n, row in zip(self.names, matrix, strict=True)
            ]
            out.append("")
        out.append("modules selected: " + ", ".join(f"{n} {c}" for n, c in zip(self.names, self.selected, strict=True)))
        return "\n".join(out)


def _selected(table: ScoreTable, k_max: int) -> set[str]:
    try:
        setting = select(table, k_max)
    except UserError:  # every score negative: nothing selected
        return set()
    return set(setting.modules)


def compare(tables: Sequence[ScoreTable], names: Sequence[str], k_max: int = 2) -> Comparison:
    """Pairwise agreement of score tables over the same backbone's modules."""
    if len(tables) < 2:
        raise UserError("compare needs at least two score files")
    first = tables[0]
    for name, t in zip(names[1:], tables[1:], strict=True):
        if t.keys != first.keys or t.backbone.get("weights_digest") != first.backbone.get("weights_digest"):
            raise UserError(
                f"{name} scores another backbone than {names[0]} (modules or weights differ): "
                "compare scores of one backbone"
            )
    vectors = [[t.values[k] for k in first.keys] for t in tables]
    chosen = [_selected(t, k_max) for t in tables]
    n = len(tables)
    spearman = [[1.0] * n for _ in range(n)]
    kendall = [[1.0] * n for _ in range(n)]
    overlap = [[1.0] * n for _ in range(n)]
    common = [[len(chosen[i])] * n for i in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                spearman[i][j] = float(stats.spearmanr(vectors[i], vectors[j]).statistic)
                kendall[i][j] = float(stats.kendalltau(vectors[i], vectors[j]).statistic)
                union = chosen[i] | chosen[j]
                common[i][j] = len(chosen[i] & chosen[j])
                overlap[i][j] = common[i][j] / len(union) if union else 1.0
    return Comparison(list(names), spearman, kendall, overlap, common, [len(c) for c in chosen], k_max)


def compare_files(paths: Sequence[str | Path], k_max: int = 2) -> Comparison:
    names = [str(p) for p in paths]
    return compare([ScoreTable.read(p) for p in paths], names, k_max)
