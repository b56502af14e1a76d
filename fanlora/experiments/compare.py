"""``fanlora compare A B``: two evaluations of one task (``fanlora evaluate --out`` folders or grid cells), paired
item by item with the grid's statistics (:mod:`fanlora.experiments.stats`) — e.g. execution accuracy of two cells'
adapters scored after their grid ran, which the grid itself never generated. Items are resampled by their
cluster (items.jsonl's ``cluster``; for folders written before it existed, the task's own key, found from the
folder's metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path

from fanlora import atomic
from fanlora.errors import UserError
from fanlora.experiments import stats


def item_values(folder: str, metric: str) -> dict[str, float]:
    """item id → ``metric`` from ``folder/items.jsonl``."""
    path = Path(folder) / "items.jsonl"
    if not path.is_file():
        raise UserError(f"{folder} has no items.jsonl: give one `fanlora evaluate --out` or a grid cell wrote")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = {str(r["id"]): float(r[metric]) for r in rows if r.get(metric) is not None}
    if not values:
        hint = "evaluate with --set evaluate.gold_loss=true" if metric == "gold_nll" else "use --metric gold_nll"
        raise UserError(f"{path} holds no {metric!r} per item: {hint}")
    return values


def item_clusters(folder: str) -> dict[str, str] | None:
    """item id → cluster key from ``folder/items.jsonl``, else from the task named in its metrics.json."""
    rows = [json.loads(line) for line in (Path(folder) / "items.jsonl").read_text().splitlines() if line.strip()]
    if rows and all(r.get("cluster") is not None for r in rows):
        return {str(r["id"]): str(r["cluster"]) for r in rows}
    metrics = Path(folder) / "metrics.json"
    if not metrics.is_file():
        return None  # no way to know the task: items count as independent
    info = json.loads(metrics.read_text())
    from fanlora.tasks import get_task

    try:
        known = get_task(str(info.get("task")), None).clusters(str(info.get("split") or "test"))
    except UserError:
        return None
    return {str(r["id"]): known.get(str(r["id"]), str(r["id"])) for r in rows}


def compare_folders(a: str, b: str, metric: str, out: str | None = None) -> int:
    """A − B on the same items: mean difference, 95 % interval, sign-flip p-value; printed (and saved)."""
    try:
        values_a, values_b = item_values(a, metric), item_values(b, metric)
        clusters = item_clusters(a)
        c = stats.compare({0: values_a}, {0: values_b}, (a, b), metric, metric == "value", clusters=clusters)
    except ValueError as exc:
        raise UserError(f"{exc}: compare evaluations of the same task and items") from None
    print(c.line())
    if out:
        atomic.write_json(out, c.to_dict())
    return 0
