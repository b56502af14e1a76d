"""What each placement of a published grid cost beside what it bought: a table and a Pareto figure.

A variant's placement cost is its stage a (when its scorer reads one) plus its scoring, in CPU-seconds of the
process that did the work, as each stage recorded it: ``scores*.json``'s ``cost.cpu_seconds`` (stage b) and
stage a's ``metrics.json`` ``cpu_seconds``, both copied into ``<grid>/scores/`` (``stage_a.json`` is the
latter). A fixed setting (``fixed:V,O``) costs nothing. A scores file from before CPU time was recorded gives
its wall minutes instead, marked as such. Quality is the grid's own summary (``results.json``): the mean over
seeds of the task metric and of the held-out gold loss.

    python -m fanlora.experiments.costs results/placement     # writes cost.md and <task>_pareto.png there

The figure plots quality against cost on a symmetric-log axis (zero-cost settings stay on it) and joins the
Pareto front: the placements no other placement beats on both quality and cost.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from fanlora import atomic
from fanlora.errors import UserError
from fanlora.experiments.plots import save_png
from fanlora.scoring import scorers


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} is missing: publish the grid (bash scripts/publish-grid.sh) and copy its scores in")
    return json.loads(path.read_text())


def _scoring_cost(grid: Path, scorer: str) -> tuple[float, bool]:
    """(seconds, is_cpu) of the scorer's recorded run: CPU-seconds, or wall seconds where only those exist."""
    record = _json(grid / "scores" / f"{scorers.get(scorer).stem}.json")
    cost = record.get("cost") or {}
    if "cpu_seconds" in cost:
        return float(cost["cpu_seconds"]), True
    return float(record["minutes"]) * 60 * int(record.get("processes", 1)), False


def variant_costs(grid: str | Path) -> list[dict[str, Any]]:
    """One row per variant of the published grid: its placement cost and its quality."""
    grid = Path(grid)
    summary = _json(grid / "results.json")
    stage_a = _json(grid / "scores" / "stage_a.json")
    rows = []
    for r in summary["rows"]:
        info = _json(grid / "settings" / f"{r['variant']}.rank.json")
        fixed = str(info["setting"]).startswith("fixed:")
        scoring, is_cpu = (0.0, True) if fixed else _scoring_cost(grid, info["scorer"])
        needs_a = not fixed and scorers.get(info["scorer"]).needs_stage_a
        search = float(stage_a["cpu_seconds"]) if needs_a else 0.0
        rows.append({
            "task": r["task"], "variant": r["variant"], "placement": info["setting"] if fixed else info["scorer"],
            "stage_a": needs_a, "stage_a_cpu_s": search, "scoring_s": scoring, "scoring_is_cpu": is_cpu,
            "total_min": (search + scoring) / 60, "metric": r["metric"], "seeds": len(r["values"]),
            "quality": statistics.fmean(r["values"]), "gold_nll": r.get("gold_nll_mean"),
        })  # fmt: skip
    return rows


def pareto(rows: list[dict[str, Any]], key: str, higher_is_better: bool) -> list[dict[str, Any]]:
    """The rows no other row beats on both cost and ``key`` (ties kept), cheapest first."""
    sign = 1 if higher_is_better else -1

    def beaten(a: dict[str, Any]) -> bool:
        return any(b["total_min"] <= a["total_min"] and sign * b[key] >= sign * a[key]
                   and (b["total_min"] < a["total_min"] or sign * b[key] > sign * a[key]) for b in rows)  # fmt: skip

    return sorted((a for a in rows if a[key] is not None and not beaten(a)), key=lambda a: a["total_min"])


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | placement | stage a CPU-min | scoring min | total min | seeds | "
             f"{rows[0]['metric']} (mean) | gold loss (mean) |", "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: r["total_min"]):
        scoring = f"{r['scoring_s'] / 60:.1f}" + ("" if r["scoring_is_cpu"] else " (wall)")
        loss = "—" if r["gold_nll"] is None else f"{r['gold_nll']:.4f}"
        lines.append(f"| `{r['variant']}` | {r['placement']} | {r['stage_a_cpu_s'] / 60:.1f} | {scoring} | "
                     f"{r['total_min']:.1f} | {r['seeds']} | {r['quality']:.3f} | {loss} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels, task metric and gold loss against placement cost, the Pareto front of each joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"wspace": 0.3})
    panels = ((rows[0]["metric"], "quality", True), ("held-out gold loss (lower is better)", "gold_nll", False))
    for ax, (label, key, higher) in zip(axes, panels, strict=True):
        shown = [r for r in rows if r[key] is not None]
        for r in shown:
            ax.plot(r["total_min"], r[key], "o", color="tab:red" if r["stage_a"] else "tab:blue")
            ax.annotate(r["variant"], (r["total_min"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto(shown, key, higher)
        ax.step([r["total_min"] for r in front], [r[key] for r in front], where="post", color="0.5", lw=1)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_ylabel(f"{label} (mean over seeds)")
    axes[0].set_title("red: needs a stage a; blue: none; grey: Pareto front", fontsize=9)
    fig.supxlabel("placement cost: stage a + scoring, CPU-minutes of one thread (symmetric log scale)", fontsize=10)
    save_png(fig, path)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fanlora.experiments.costs results/GRID", file=sys.stderr)
        return 2
    grid = Path(argv[0])
    try:
        rows = variant_costs(grid)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    atomic.write_text(grid / "cost.md", markdown(rows))
    for task in sorted({r["task"] for r in rows}):
        figure([r for r in rows if r["task"] == task], grid / f"{task}_pareto.png")
    print(f"wrote {grid / 'cost.md'} and the Pareto figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
