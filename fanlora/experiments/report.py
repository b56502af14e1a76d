"""Tables, paired comparisons and figures of a finished (or partly finished) experiment grid.

Summaries per (task, variant, method) give the median and range over seeds of the task's metric and the mean
held-out gold loss. The verdicts are paired: FanLoRA on the reference variant against every other
(variant, method) on the same task, item by item and seed by seed (:mod:`fanlora.experiments.stats`), from each cell's
``items.jsonl`` — on the gold loss (lower is better) and on the task's per-item score (higher is better).
Seed ranges that merely overlap are not a verdict.
"""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path
from typing import Any

from fanlora import methods
from fanlora.experiments import stats

ITEM_METRICS = (("gold_nll", False), ("value", True))  # (items.jsonl key, higher is better)


def groups_of(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Cell records by (task, variant, method), in the order first seen."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["variant"], r["method"]), []).append(r)
    return groups


def rows_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = groups_of(records)
    rows = []
    for (task, variant, method), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        values = [r["value"] for r in rs if r["value"] is not None]
        losses = [r["gold_nll"] for r in rs if r.get("gold_nll") is not None]
        rows.append(
            {
                "task": task,
                "variant": variant,
                "method": method,
                "metric": rs[0]["metric"],
                "trainable_parameters": rs[0]["trainable_parameters"],
                "seeds": [r["seed"] for r in rs],
                "values": values,
                "median": statistics.median(values) if values else None,
                "min": min(values) if values else None,
                "max": max(values) if values else None,
                "gold_nll": losses,
                "gold_nll_mean": statistics.fmean(losses) if losses else None,
                "train_minutes_median": statistics.median(r["train_minutes"] for r in rs),
                "search_minutes_median": (
                    statistics.median(r["search_minutes"] for r in rs) if "search_minutes" in rs[0] else None
                ),
                "n_test": rs[0]["n_test"],
                "n_loss": rs[0].get("n_loss", 0),
            }
        )
    return rows


@functools.lru_cache(maxsize=256)
def _items_file(path: str, mtime: float) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())


def cell_items(exp: Any, record: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The rows of one cell's items.jsonl (none when it has not written one)."""
    path = Path(exp.out) / "cells" / record["id"] / "items.jsonl"
    return _items_file(str(path), path.stat().st_mtime) if path.is_file() else ()


def item_outcomes(exp: Any, records: list[dict[str, Any]], key: str) -> dict[int, dict[str, float]]:
    """seed → item id → value of ``key`` in each cell's items.jsonl."""
    out: dict[int, dict[str, float]] = {}
    for r in records:
        values = {row["id"]: row[key] for row in cell_items(exp, r) if row.get(key) is not None}
        if values:
            out[r["seed"]] = values
    return out


@functools.lru_cache(maxsize=16)
def _task_clusters(task: str, split: str) -> dict[str, str]:
    from fanlora.tasks import get_task

    return get_task(task).clusters(split)


def item_clusters(exp: Any, records: list[dict[str, Any]]) -> dict[str, str]:
    """item id → cluster key for the cells of one task: from their items.jsonl, and for cells written before
    items.jsonl carried clusters, from the task's own data (the same key the task gives a new evaluation)."""
    out: dict[str, str] = {}
    missing: set[str] = set()
    for r in records:
        for row in cell_items(exp, r):
            if row.get("cluster") is not None:
                out.setdefault(row["id"], str(row["cluster"]))
            else:
                missing.add(row["id"])
    missing -= set(out)
    if missing:
        split = "test"
        metrics = Path(exp.out) / "cells" / records[0]["id"] / "metrics.json"
        if metrics.is_file():
            split = json.loads(metrics.read_text()).get("split") or split
        known = _task_clusters(records[0]["task"], split)
        out.update({item: known.get(item, item) for item in missing})  # an item the task lacks: its own cluster
    return out


def paired(exp: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FanLoRA on the reference variant against every other group of the same task, per item metric; and
    every pair of the other groups that ran more than one seed (the contenders), so each pair has a verdict."""
    reference = exp.reference or next(iter(exp.variants))
    groups = groups_of(records)
    out = []
    for (task, variant, method), rs in sorted(groups.items()):
        ref = groups.get((task, reference, "fanlora"))
        if ref is None or (variant, method) == (reference, "fanlora"):
            continue
        out += _pair(exp, task, ref, rs, (f"fanlora/{reference}", f"{method}/{variant}"))
    seeded = sorted(
        (g, rs) for g, rs in groups.items() if g[1:] != (reference, "fanlora") and len({r["seed"] for r in rs}) > 1
    )
    for i, ((task, variant, method), rs) in enumerate(seeded):
        for (task_b, variant_b, method_b), rs_b in seeded[i + 1 :]:
            if task_b == task:
                out += _pair(exp, task, rs, rs_b, (f"{method}/{variant}", f"{method_b}/{variant_b}"))
    return out


def _pair(exp: Any, task: str, ra: list[dict[str, Any]], rb: list[dict[str, Any]], names: tuple[str, str]) -> list:
    """Group A against group B on the seeds both ran, per item metric (an unpaired set is reported as such)."""
    out = []
    for key, higher in ITEM_METRICS:
        a, b = item_outcomes(exp, ra, key), item_outcomes(exp, rb, key)
        common = sorted(set(a) & set(b))  # pair on the seeds both have run (a grid may be part-way)
        if not common:
            continue
        a, b = {s: a[s] for s in common}, {s: b[s] for s in common}
        try:
            c = stats.compare(a, b, names, key, higher, clusters=item_clusters(exp, [*ra, *rb]))
        except ValueError as exc:  # another item set or seeds: reported, not compared
            out.append({"task": task, "a": names[0], "b": names[1], "metric": key, "unpaired": str(exc)})
            continue
        out.append({"task": task, **c.to_dict(), "b_trainable_parameters": rb[0]["trainable_parameters"]})
    return out


def pools_of(exp: Any) -> dict[str, list[str]]:
    """Variants that are draws of one rule: every ``random:<seed>`` setting is a draw of "random"."""
    pools: dict[str, list[str]] = {}
    for name, variant in exp.variants.items():
        rule = variant.setting.partition(":")[0]
        if rule == "random":
            pools.setdefault(rule, []).append(name)
    return pools


def pooled(exp: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FanLoRA on the reference variant against each rule's finished draws (at least two), per item metric."""
    reference = exp.reference or next(iter(exp.variants))
    out = []
    for task in exp.tasks:
        ref = [r for r in records if (r["task"], r["variant"], r["method"]) == (task, reference, "fanlora")]
        for rule, members in pools_of(exp).items():
            draws = {v: [r for r in records if (r["task"], r["variant"], r["method"]) == (task, v, "fanlora")]
                     for v in members}  # fmt: skip
            draws = {v: rs for v, rs in draws.items() if rs}
            if not ref or len(draws) < 2:
                continue
            for key, higher in ITEM_METRICS:
                a = item_outcomes(exp, ref, key)
                pool = {v: item_outcomes(exp, rs, key) for v, rs in draws.items()}
                common = sorted(set(a).intersection(*pool.values()))
                if not common or not all(pool.values()):
                    continue
                pool = {v: {s: o[s] for s in common} for v, o in pool.items()}
                names = (f"fanlora/{reference}", f"{rule} ({len(pool)} settings)")
                try:
                    clusters = item_clusters(exp, [*ref, *(r for rs in draws.values() for r in rs)])
                    c = stats.compare_to_pool({s: a[s] for s in common}, pool, names, key, higher, clusters=clusters)
                except ValueError as exc:
                    out.append({"task": task, "a": names[0], "pool": names[1], "metric": key, "unpaired": str(exc)})
                    continue
                out.append({"task": task, **c.to_dict()})
    return out


def seed_effects(exp: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every group run under several seeds: how far its seeds' means lie apart, and the share of test items
    whose outcome changes with the seed — whether the seeds' models really differ, item by item."""
    groups = groups_of(records)
    out = []
    for (task, variant, method), rs in sorted(groups.items()):
        for key, _ in ITEM_METRICS:
            outcomes = item_outcomes(exp, rs, key)
            if len(outcomes) < 2:
                continue
            try:
                spread = stats.seed_spread(outcomes)
            except KeyError:  # seeds scored on different items: nothing to say item by item
                continue
            group = f"{method}/{variant}"
            out.append({"task": task, "group": group, "metric": key, "n_seeds": len(outcomes), **spread})
    return out


def _verdict_line(c: dict[str, Any]) -> str:
    if "unpaired" in c:
        return f"- {c['a']} vs {c['b']} ({c['metric']}): not compared — {c['unpaired']}"
    return f"- {stats.comparison_line(c)}"


def _pool_line(c: dict[str, Any]) -> str:
    if "unpaired" in c:
        return f"- {c['a']} vs {c['pool']} ({c['metric']}): not compared — {c['unpaired']}"
    draws = ", ".join(f"{m} {v:.4f}" for m, v in zip(c["members"], c["member_means"], strict=True))
    units = stats.design(c["n_items"], c.get("n_clusters") or c["n_items"], len(c["members"]), "draw")
    note = f" ({c['note']})" if c.get("note") else ""
    return (
        f"- {c['a']} vs {c['pool']} ({c['metric']}, {units}): {c['mean_diff']:+.4f} "
        f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] (width {c['ci_high'] - c['ci_low']:.4f}) → "
        f"**{c['verdict']}**; A = {c['mean_a']:.4f}, draws: {draws}; {c['better_members']} of "
        f"{len(c['members'])} draws as good as A, rank p = {c['p_rank']:.3g}{note}"
    )


def _structure_line(f: dict[str, Any]) -> str:
    counts = ", ".join(f"{what} {n}" for what, n in f["counts"].items())
    search = f"; search {f['search_minutes']:.1f} min" if f.get("search_minutes") is not None else ""
    return (
        f"- {f['method']}/{f['variant']}: {f['elements']} elements in {len(f['layers'])} layers, "
        f"{f['trainable_parameters']:,} params{search} — {counts}"
    )


def _seed_line(e: dict[str, Any]) -> str:
    return (
        f"- {e['group']} ({e['metric']}, {e['n_seeds']} seeds): seed means {e['seed_means_min']:.4f} – "
        f"{e['seed_means_max']:.4f}; {100 * e['items_that_change_across_seeds']:.1f} % of items change, "
        f"by {e['item_sd_across_seeds']:.4f} (mean per-item SD across seeds)"
    )


#: The verdict sections of a task on results.md: summary key → (heading, one entry's line).
SECTIONS: dict[str, tuple[str, Any]] = {
    "comparisons": (
        "Paired comparisons (A − B over the same items and seeds; 95 % interval resampling clusters of items "
        "that share a source — a question template, a passage, a subject — and, where more than one ran, "
        "training seeds as a random effect; beside it the interval that treats items as independent; p: "
        "sign flips of whole clusters; the verdict uses the clustered interval):",
        _verdict_line,
    ),
    "pool_comparisons": (
        "Against a rule's draws (A − each draw per item; 95 % interval resampling draws and clusters of items; rank p: "
        "(1 + draws at least as good as A) / (1 + draws)):",
        _pool_line,
    ),
    "structures": (
        "Structures (what each method put where; FanLoRA's is its setting, the others' what their search kept):",
        _structure_line,
    ),
    "seeds": ("Seeds (per-item outputs of the same group under different seeds):", _seed_line),
}


def section_lines(key: str, task: str, entries: list[dict[str, Any]]) -> list[str]:
    """The ``key`` section of ``task`` (nothing when it has no entries)."""
    mine = [e for e in entries if e["task"] == task]
    if not mine:
        return []
    heading, line = SECTIONS[key]
    return [heading, "", *(line(e) for e in mine), ""]


def markdown(exp: Any, summary: dict[str, Any], notes: str = "") -> str:
    """The grid's results page; ``notes`` (the report folder's ``notes.md``, written by hand: the study's
    design, sizing and reading) stands under the title, the generated tables and verdicts after it."""
    lines = [
        f"# {exp.name}",
        "",
        *([notes.strip(), ""] if notes.strip() else []),
        f"{summary['cells_done']} of {summary['cells']} cells done; grid cost {summary['grid_minutes']} "
        "CPU-process minutes (train + evaluate, summed over cells).",
        "",
    ]
    for task in exp.tasks:
        rows = [r for r in summary["rows"] if r["task"] == task]
        extra = [line for key in SECTIONS for line in section_lines(key, task, summary.get(key, []))]
        if rows:
            lines += _table(exp, task, rows)
        elif extra:
            lines += [f"## {task}", ""]
        lines += extra
    return "\n".join(lines)


def _searched(method: str) -> bool:
    return method in methods.names() and methods.get(method).searched


def structures(exp: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each searched method kept, beside the reference FanLoRA setting: counts by what and layers used."""
    if not any(_searched(r["method"]) for r in records):
        return []
    from collections import Counter

    from fanlora.setting import Setting

    reference = exp.reference or next(iter(exp.variants))
    out = []
    for r in records:
        if _searched(r["method"]) and r.get("structure"):
            parts = [methods.get(r["method"]).describe(label) for label in r["structure"]]
        elif r["method"] == "fanlora" and r["variant"] == reference:
            path = Path(exp.out) / "settings" / f"{reference}.json"
            if not path.is_file():
                continue
            kept = Setting.read(path).kept
            parts = [(f"LoRA {kind}", layer) for layer, kinds in kept.items() for kind in kinds]
        else:
            continue
        counts = Counter(what for what, _ in parts)
        out.append({
            "task": r["task"], "cell": r["id"], "method": r["method"], "variant": r["variant"],
            "trainable_parameters": r["trainable_parameters"], "elements": len(parts),
            "layers": sorted({layer for _, layer in parts}), "counts": dict(counts.most_common()),
            "search_minutes": r.get("search_minutes"),
        })  # fmt: skip
    return out


def _table(exp: Any, task: str, rows: list[dict[str, Any]]) -> list[str]:
    order = {m: i for i, m in enumerate(methods.names())}
    lines = [
        f"## {task} ({rows[0]['metric']} on {rows[0]['n_test']} test examples; gold loss on {rows[0]['n_loss']})"
        if rows[0]["n_test"]
        else f"## {task} (gold loss on {rows[0]['n_loss']} test examples; the task's metric not computed)",
        "",
        "| variant | method | trainable params | median | min – max | per seed | gold NLL (mean) | train min "
        "| search min |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (list(exp.variants).index(r["variant"]), order[r["method"]])):
        per_seed = ", ".join(f"{v:.3f}" for v in r["values"])
        med = "–" if r["median"] is None else f"{r['median']:.3f}"
        rng = "–" if r["min"] is None else f"{r['min']:.3f} – {r['max']:.3f}"
        nll = "–" if r["gold_nll_mean"] is None else f"{r['gold_nll_mean']:.4f}"
        search = "–" if r.get("search_minutes_median") is None else f"{r['search_minutes_median']:.1f}"
        lines.append(
            f"| {r['variant']} | {r['method']} | {r['trainable_parameters']:,} | {med} | {rng} | {per_seed} | "
            f"{nll} | {r['train_minutes_median']:.2f} | {search} |"
        )
    return [*lines, ""]
