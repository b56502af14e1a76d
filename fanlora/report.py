"""``fanlora report RUN_DIR``: one self-contained HTML page that shows a run at a glance.

A run's results are spread over JSON files and PNGs; this page gathers them: the backbone and config, stage
a's loss curve, the score heatmap (layers × kinds, the value on hover), the setting (modules per layer, per
kind, trainable parameters, predicted decode slowdown), every task's metrics found in the run (base vs
adapter), and the latency profile and bench output when present. Everything is inline — the chart is SVG
written here, images are base64, the one small script only shows the hovered value — so the file opens from
disk with no network. Plain string templates rather than a templating library: the page is small and every
value goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from fanlora import atomic
from fanlora.backbone import module_key
from fanlora.config import R1
from fanlora.errors import UserError
from fanlora.scoring.table import ScoreTable
from fanlora.setting import Setting

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.heat td{width:46px;height:16px;padding:0;font-size:10px}
.heat td.kept{outline:2px solid #111;outline-offset:-2px}#hover{font-family:monospace;min-height:1.3em}
.grid{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}pre{background:#f7f7f7;padding:8px;overflow:auto}
"""
SCRIPT = """
document.querySelectorAll('.heat td[data-score]').forEach(function (cell) {
  cell.addEventListener('mouseenter', function () {
    document.getElementById('hover').textContent =
      cell.dataset.module + '  score ' + cell.dataset.score + (cell.classList.contains('kept') ? '  (kept)' : '');
  });
});
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def _json(path: Path, strict: bool = True) -> Any:
    """A run file's JSON object, None when the file is absent. A file that is there but cut short or not a JSON
    object is refused (``strict``: one error line naming it) — a page built on it would silently show an empty
    config; a trainer checkpoint's state (``strict=False``) may be cut by a kill and only loses the loss curve."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        data, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "not a JSON object"
    if isinstance(data, dict) or not strict:
        return data if isinstance(data, dict) else None
    raise UserError(f"{path} is unreadable ({why}): restore it, or re-run the stage that writes it")


def _color(value: float, bound: float) -> str:
    """Red for positive scores (helps), blue for negative, white at zero (the PNG heatmap's palette)."""
    t = max(-1.0, min(1.0, value / bound)) if bound else 0.0
    fade = int(255 * (1 - abs(t)))
    return f"rgb(255,{fade},{fade})" if t >= 0 else f"rgb({fade},{fade},255)"


def heatmap(table: ScoreTable, setting: Setting | None) -> str:
    bound = max((abs(v) for v in table.values.values()), default=1.0) or 1.0
    head = "".join(f"<th>{esc(k)}</th>" for k in table.kinds)
    rows = []
    for layer in range(table.num_layers):
        kept = setting.kept.get(layer, []) if setting else []
        cells = []
        for kind in table.kinds:
            v = table.score(kind, layer)
            cls = ' class="kept"' if kind in kept else ""
            cells.append(
                f'<td{cls} style="background:{_color(v, bound)}" title="{esc(kind)}.{layer}: {v:.6g}" '
                f'data-score="{v:.6g}" data-module="{esc(table.module_names[module_key(kind, layer)])}"></td>'
            )
        rows.append(f"<tr><th>{layer}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="heat" id="heatmap"><tr><th>layer</th>{head}</tr>{"".join(rows)}</table>'
        '<p id="hover">hover a cell for its score; outlined cells are kept</p>'
    )


def loss_svg(history: list[dict[str, Any]], width: int = 460, height: int = 220) -> str:
    """Train and eval loss against step as an inline SVG line chart."""
    series = {
        "train": [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h],
        "eval": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h],
    }
    points = [p for s in series.values() for p in s]
    if not points:
        return "<p>no loss log found in the run</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    pad, sx = 40, (width - 60) / ((x1 - x0) or 1)
    sy = (height - 60) / ((y1 - y0) or 1)

    def xy(p: tuple[float, float]) -> str:
        return f"{pad + (p[0] - x0) * sx:.1f},{height - pad - (p[1] - y0) * sy:.1f}"

    colors = {"train": "#1f77b4", "eval": "#d62728"}
    parts = [f'<svg id="loss" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - 20}" y2="{height - pad}" stroke="#888"/>')
    parts.append(f'<line x1="{pad}" y1="20" x2="{pad}" y2="{height - pad}" stroke="#888"/>')
    parts.append(f'<text x="{pad}" y="{height - 24}" font-size="11">step {x0:g}</text>')
    parts.append(f'<text x="{width - 80}" y="{height - 24}" font-size="11">step {x1:g}</text>')
    parts.append(f'<text x="2" y="24" font-size="11">{y1:.3f}</text>')
    parts.append(f'<text x="2" y="{height - pad}" font-size="11">{y0:.3f}</text>')
    for i, (name, pts) in enumerate(series.items()):
        if pts:
            line = " ".join(xy(p) for p in pts)
            parts.append(f'<polyline fill="none" stroke="{colors[name]}" stroke-width="2" points="{line}"/>')
            parts.append(
                f'<text x="{140 + 90 * i}" y="{height - 4}" font-size="12" fill="{colors[name]}">{name} loss</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def stage_a_history(run: Path) -> list[dict[str, Any]]:
    """The log of stage a's last checkpoint (the Trainer keeps the whole history in every checkpoint)."""
    states = sorted(
        (run / "search" / "checkpoints").glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.rsplit("-", 1)[1]),
    )
    data = _json(states[-1], strict=False) if states else None
    return (data or {}).get("log_history", [])


def table_html(header: list[str], rows: list[list[Any]], ident: str = "") -> str:
    idattr = f' id="{ident}"' if ident else ""
    head = "".join(f'<th class="l">{esc(h)}</th>' if i == 0 else f"<th>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="l">{esc(c)}</td>' if i == 0 else f"<td>{esc(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table{idattr}><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def metrics_section(run: Path) -> str:
    """Every ``<task>/<who>/metrics.json`` (who: base or an adapter run) as one table per task."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(run.glob("*/*/metrics.json")):
        task, who = path.parent.parent.name, path.parent.name
        data = _json(path)
        if task == "search" or not isinstance(data, dict):
            continue
        found.setdefault(task, {})[who] = data
    if not found:
        return '<p id="metrics">no task metrics in this run</p>'
    parts = ['<div id="metrics">']
    for task, runs in found.items():
        keys = [k for k in dict.fromkeys(k for d in runs.values() for k, v in d.items()) if _is_number(runs, k)]
        whos = sorted(runs, key=lambda w: (w != "base", w))
        rows = [[k, *(_fmt(runs[w].get(k)) for w in whos)] for k in keys]
        parts.append(f"<h3>{esc(task)}</h3>" + table_html(["metric", *whos], rows))
    parts.append("</div>")
    return "".join(parts)


def _is_number(runs: dict[str, dict[str, Any]], key: str) -> bool:
    values = [d.get(key) for d in runs.values() if key in d]
    return bool(values) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _setting_params(setting: Setting, r1: int) -> int | None:
    """Trainable parameters of rank ``r1`` on the setting (None when the backbone cannot be loaded here)."""
    try:
        from fanlora.stages.budget import module_shapes

        shapes = module_shapes(setting.backbone.get("source", "embedded"), setting.module_paths)
    except (UserError, OSError, ValueError):
        return None
    return sum(r1 * sum(shapes[m]) for m in setting.modules if m in shapes)


def _profile(setting: Setting) -> tuple[Path, dict[str, Any]] | None:
    try:
        from fanlora.latency import profile as latency

        return latency.find_profile(setting.backbone)
    except UserError:
        return None


def setting_section(setting: Setting, r1: int) -> str:
    per_layer = [[n, ", ".join(setting.kept.get(n, [])) or "—"] for n in range(setting.num_layers)]
    counts = [[k, sum(k in v for v in setting.kept.values())] for k in setting.kinds]
    params = _setting_params(setting, r1)
    found = _profile(setting)
    facts = [
        ["modules kept", f"{setting.n_modules} of {setting.num_layers * len(setting.kinds)}"],
        ["K_max (per-layer cap)", setting.k_max],
        [f"trainable parameters at r1={r1}", "unknown" if params is None else f"{params:,}"],
    ]
    if found:
        from fanlora.latency import profile as latency

        lo, hi = latency.predict_interval(setting, found[1])
        guess = f"{latency.predict(setting, found[1]) * 100:+.2f}% [95% CI {lo * 100:+.2f}, {hi * 100:+.2f}]"
        facts.append(["predicted decode-step slowdown", f"{guess} ({found[0].name})"])
    else:
        facts.append(["predicted decode slowdown", "no latency profile (run `fanlora profile`)"])
    budget = setting.source.get("budget")
    if budget:
        facts.append(["budget", f"{budget['text']} (predicted cost {budget['predicted_cost']:.6g})"])
    return (
        '<div class="grid" id="setting"><div>'
        + table_html(["fact", "value"], facts, "setting-facts")
        + "<br>"
        + table_html(["kind", "layers keeping it"], counts, "setting-kinds")
        + "</div>"
        + table_html(["layer", "kinds kept (best first)"], per_layer, "setting-layers")
        + "</div>"
    )


def profile_section(setting: Setting | None) -> str:
    found = _profile(setting) if setting else None
    if not found:
        return "<p>no latency profile for this backbone</p>"
    where, prof = found
    rows = [
        [
            k,
            f"{v['ratio']['median']:.4f}",
            f"[{v['ratio']['q1']:.4f}, {v['ratio']['q3']:.4f}]",
            f"{v['per_module'] * 100:+.3f}%",
        ]
        for k, v in prof["kinds"].items()
    ]
    note = f"<p>{esc(where)}: r={prof['r']}, {prof['threads']} threads, {prof['rounds']} balanced rounds</p>"
    return note + table_html(["kind", "time vs base (all layers)", "quartiles", "per module"], rows, "profile")


def images(run: Path) -> str:
    tags = []
    for png in sorted(run.glob("plots/*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        img = f'<img alt="{esc(png.stem)}" src="data:image/png;base64,{data}">'
        tags.append(f"<figure>{img}<figcaption>{esc(png.name)}</figcaption></figure>")
    return '<div class="grid">' + "".join(tags) + "</div>" if tags else ""


def build(run: Path) -> str:
    """The page's HTML for run directory ``run``."""
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist: pass a directory made by fanlora search/demo")
    config = (_json(run / "run.json") or {}).get("config", {})
    table = ScoreTable.read(run / "scores.json") if (run / "scores.json").is_file() else None
    setting = Setting.read(run / "setting.json") if (run / "setting.json").is_file() else None
    if table is None and setting is None:
        raise UserError(
            f"{run} holds neither scores.json nor setting.json: run `fanlora score` and `fanlora select` first"
        )
    backbone = (setting or table).backbone
    r1 = int(config.get("finetune", {}).get("lora", {}).get("r", R1))
    search = _json(run / "search" / "metrics.json") or {}
    sections = [
        f"<h1>fanlora run {esc(run)}</h1>",
        f"<p>written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}; backbone <b>{esc(backbone.get('name'))}</b> "
        f"({esc(backbone.get('public_name', backbone.get('source')))}, {esc(backbone.get('num_layers'))} layers, "
        f"weights {esc(backbone.get('weights_digest'))})</p>",
        '<div class="grid"><div><h2>Stage a: loss</h2>'
        + loss_svg(stage_a_history(run))
        + (
            f"<p>{esc(search.get('steps'))} steps, best val loss {_fmt(search.get('best_eval_loss'))}</p>"
            if search
            else ""
        )
        + "</div><div><h2>Tasks</h2>"
        + metrics_section(run)
        + "</div></div>",
        '<div class="grid"><div><h2>Stage b: scores</h2>'
        + (heatmap(table, setting) if table else "<p>no scores.json</p>")
        + "</div><div><h2>Stage c: setting</h2>"
        + (setting_section(setting, r1) if setting else "<p>no setting.json</p>")
        + "</div></div>",
        "<h2>Latency profile</h2>" + profile_section(setting),
    ]
    bench = run / "bench.txt"
    if bench.is_file():
        sections.append(f"<h2>Bench</h2><pre>{esc(bench.read_text())}</pre>")
    sections.append("<h2>Figures</h2>" + images(run))
    sections.append(
        f"<h2>Config</h2><details><summary>run.json</summary><pre>{esc(json.dumps(config, indent=1))}</pre></details>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>fanlora report: {esc(run.name)}</title><style>{STYLE}</style></head><body>"
        + "".join(sections)
        + f"<script>{SCRIPT}</script></body></html>"
    )


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` in the run directory (or ``out``) and return its path."""
    run = Path(run)
    page = build(run)
    return atomic.write_text(Path(out) if out else run / "report.html", page)
