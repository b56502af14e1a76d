"""Quality against decode cost: the settings of an experiment grid (K_max = 1, 2, 3, all modules, budgets).

Quality is what ``fanlora experiment`` measured for each variant (held-out gold loss after the same short
fine-tune, with paired intervals against the reference variant, from the grid's results.json). Cost is
measured here, in one run: the engine on every variant's setting against the bare backbone in balanced rounds
(:func:`fanlora.latency.profile.overheads`), beside what the backbone's latency profile predicts. Time it on an
otherwise idle machine (stop other jobs first).

    fanlora profile --backbone embedded --out benchmarks/results/profile-embedded.json
    OMP_NUM_THREADS=1 fanlora experiment configs/experiments/pareto.yaml
    python benchmarks/pareto.py configs/experiments/pareto.yaml --out benchmarks/results/pareto
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fanlora import atomic
from fanlora.experiments import config as experiment_config
from fanlora.latency import profile as latency
from fanlora.latency.timing import spread
from fanlora.setting import Setting


def quality(exp: experiment_config.Experiment) -> tuple[dict[str, dict], list[dict]]:
    """Per variant: mean gold loss and parameters (from cells.json); the paired comparisons (results.json)."""
    cells = json.loads((Path(exp.report) / "cells.json").read_text())
    results = json.loads((Path(exp.report) / "results.json").read_text())
    per: dict[str, dict] = {}
    for c in cells:
        if c.get("gold_nll") is not None:
            v = per.setdefault(c["variant"], {"gold_nll": [], "params": c["trainable_parameters"]})
            v["gold_nll"].append(c["gold_nll"])
    paired = [r for r in results.get("comparisons", []) if r.get("metric") == "gold_nll" and "mean_diff" in r]
    return per, paired


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the experiment grid whose settings and cells to plot")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results/pareto", help="writes OUT.txt, OUT.json, OUT.png")
    p.add_argument(
        "--timings",
        help="reuse the decode-step ratios a previous run saved (OUT.timings.json) instead of timing again: "
        "the grid's cells can finish after the settings were timed",
    )
    args = p.parse_args(argv)
    exp = experiment_config.parse(args.config)
    settings = {v: Setting.read(Path(exp.out) / "settings" / f"{v}.json") for v in exp.variants}
    first = next(iter(settings.values()))
    _, prof = latency.find_profile(first.backbone)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"$ python benchmarks/pareto.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    out = Path(args.out)
    if args.timings:
        ratios = json.loads(Path(args.timings).read_text())["ratios"]
        say(f"decode-step ratios from {args.timings}")
    else:
        backbone = first.backbone.get("source", "embedded")
        ratios = latency.overheads(backbone, settings, prof["r"], 276, 8, args.rounds, say)
        atomic.write_json(out.with_suffix(".timings.json"), {"ratios": ratios, "rounds": args.rounds})
    per, paired = quality(exp) if (Path(exp.report) / "results.json").is_file() else ({}, [])
    ref = exp.reference or next(iter(exp.variants))
    rows = []
    for name, setting in settings.items():
        s = spread(ratios[name])
        vs_ref = next((c for c in paired if c["b"].endswith(f"/{name}")), None)
        rows.append(
            {
                "variant": name,
                "rule": exp.variants[name].setting,
                "k_max": exp.variants[name].k_max,
                "modules": setting.n_modules,
                "trainable_parameters": per.get(name, {}).get("params"),
                "overhead_measured": s["median"] - 1,
                "overhead_q1": s["q1"] - 1,
                "overhead_q3": s["q3"] - 1,
                "overhead_predicted": latency.predict(setting, prof),
                "overhead_predicted_ci": list(latency.predict_interval(setting, prof)),
                "gold_nll": statistics.fmean(per[name]["gold_nll"]) if name in per else None,
                "vs_reference": vs_ref,
            }
        )
    noise = spread(ratios[latency.AGAIN])
    say(f"noise floor (base vs base): median {noise['median']:.4f} [q1 {noise['q1']:.4f}, q3 {noise['q3']:.4f}]")
    say("")
    say(f"| variant | modules | params | time vs base [q1, q3] | predicted | gold NLL | {ref} − variant [95% CI] |")
    say("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c = r["vs_reference"]
        none = "(reference)" if r["variant"] == ref else "— (cell not run yet)"
        diff = f"{c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" if c else none
        nll = "—" if r["gold_nll"] is None else f"{r['gold_nll']:.4f}"
        say(
            f"| {r['variant']} | {r['modules']} | {r['trainable_parameters'] or '—'} | "
            f"{r['overhead_measured'] * 100:+.2f}% [{r['overhead_q1'] * 100:+.2f}, {r['overhead_q3'] * 100:+.2f}] | "
            f"{r['overhead_predicted'] * 100:+.2f}% [{r['overhead_predicted_ci'][0] * 100:+.2f}, "
            f"{r['overhead_predicted_ci'][1] * 100:+.2f}] | {nll} | {diff} |"
        )
    atomic.write_json(
        out.with_suffix(".json"), {"rows": rows, "noise": noise, "profile_r": prof["r"], "rounds": args.rounds}
    )
    atomic.write_text(out.with_suffix(".txt"), "\n".join(lines) + "\n")
    plot(rows, ref, out.with_suffix(".png"))
    return 0


def plot(rows: list[dict], ref: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        if r["gold_nll"] is None:
            continue
        x = r["overhead_measured"] * 100
        xerr = [[x - r["overhead_q1"] * 100], [r["overhead_q3"] * 100 - x]]
        c = r["vs_reference"]
        # the paired 95% interval of (variant − reference), drawn around the variant's mean
        yerr = [[c["ci_high"] - c["mean_diff"]], [c["mean_diff"] - c["ci_low"]]] if c else None
        bar = ax.errorbar(x, r["gold_nll"], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        ax.plot(r["overhead_predicted"] * 100, r["gold_nll"], "x", color=bar[0].get_color(), markersize=9)
        ax.annotate(f"{r['variant']} ({r['modules']})", (x, r["gold_nll"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("decode-step time vs base (%): o measured (bars: quartiles), x predicted")
    ax.set_ylabel("SQL test gold NLL (lower is better)")
    ax.set_title(f"Quality vs decode cost (bars: paired 95% CI vs {ref})")
    fig.tight_layout()
    buf = __import__("io").BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
