"""The figures of an experiment grid's report: the metric per variant, and the gold loss of every group with
its clustered interval (:func:`fanlora.experiments.stats.mean_interval`). Split from :mod:`fanlora.experiments.report`,
which owns the tables and verdicts."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fanlora import atomic, methods
from fanlora.experiments import stats
from fanlora.experiments.report import item_clusters, item_outcomes


def plot(exp: Any, rows: list[dict[str, Any]], report: Path) -> None:
    """Per task: the metric (median, min–max over seeds) per variant, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(exp.variants)
    for task in exp.tasks:
        task_rows = [r for r in rows if r["task"] == task and r["median"] is not None]
        if not task_rows:
            continue
        fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(names), 3.2))
        for method in methods.names():
            pts = sorted(
                ((names.index(r["variant"]), r) for r in task_rows if r["method"] == method), key=lambda p: p[0]
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            med = [p[1]["median"] for p in pts]
            err = [[p[1]["median"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["median"] for p in pts]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(f"{task_rows[0]['metric']} (median, min–max over seeds)")
        ax.set_title(f"{exp.name}: {task}")
        ax.legend(fontsize=8)
        save_png(fig, report / f"{task}.png")


def loss_plot(exp: Any, records: list[dict[str, Any]], report: Path) -> None:
    """Per task: held-out gold loss of every (variant, method) with its 95 % interval (clusters of items and
    seeds resampled); random settings in grey (the null distribution), the reference FanLoRA as a red star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = exp.reference or next(iter(exp.variants))
    for task in exp.tasks:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in records:
            if r["task"] == task and r.get("gold_nll") is not None:
                groups.setdefault((r["variant"], r["method"]), []).append(r)
        if len(groups) < 2:
            continue
        points = []
        for (variant, method), rs in groups.items():
            mean, lo, hi = stats.mean_interval(item_outcomes(exp, rs, "gold_nll"), item_clusters(exp, rs))
            points.append((f"{method}/{variant}", mean, lo, hi, variant, method))
        points.sort(key=lambda p: p[1])
        fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.35 * len(points)))
        for y, (_, mean, lo, hi, variant, method) in enumerate(points):
            is_ref = (variant, method) == (reference, "fanlora")
            color = "tab:red" if is_ref else ("0.6" if variant.startswith("random") else "tab:blue")
            ax.errorbar(mean, y, xerr=[[mean - lo], [hi - mean]], fmt="*" if is_ref else "o", color=color,
                        markersize=12 if is_ref else 6, capsize=3)  # fmt: skip
        ax.set_yticks(range(len(points)), [p[0] for p in points])
        ax.set_xlabel(f"{task}: held-out gold loss (mean NLL per token; 95 % clustered interval)")
        ax.set_title(f"{exp.name}: red star = FanLoRA/{reference}, grey = random settings")
        save_png(fig, report / f"{task}_gold_loss.png")


def save_png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())
