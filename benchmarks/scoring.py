"""Naive vs cached exact AB-score, and the first-order estimate, side by side on the embedded backbone.

    python benchmarks/scoring.py [--run-dir runs/bench-scoring] [--val-examples 5]

All three run in this one process on the same validation examples — the instruction corpus's val split
with response-only loss, exactly as stage b runs — so the ratios compare like with like on a noisy shared
machine. "Naive" is what a user would first write: for each of the 2 + 2·N·L model settings, switch PEFT
gates and call ``model(**batch)`` (full logits, HF's own loss). The cached engine runs twice (before and
after the naive one) and its mean time is used. A stage-a adapter is trained first (demo recipe, ~3 min)
unless the run directory already holds one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fanlora.backbone import from_config
from fanlora.config import load_config
from fanlora.data.instruct import for_search
from fanlora.gates import GatedLoRA
from fanlora.latency.rss import PeakRSS
from fanlora.scoring import make_batches
from fanlora.scoring.compare import stats
from fanlora.scoring.journal import Journal
from fanlora.scoring.naive import naive_ab
from fanlora.scoring.study import Study, assemble, compute
from fanlora.stages.rundir import prepare
from fanlora.stages.search import run_search


def engine(study: Study, gated: GatedLoRA, batches, directory: Path) -> tuple[dict[str, float], float, float]:
    for p in directory.glob(f"{study.stem}.partial.*.jsonl"):
        p.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    progress = Journal(directory, study.stem, {"bench": 1})
    with PeakRSS() as mem:
        start = time.perf_counter()
        compute(study, gated, batches, progress, study.units(0, 1), 2**40)
        seconds = time.perf_counter() - start
    progress.remove_all()
    return assemble(study, progress.done).values, seconds, mem.mb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/bench-scoring")
    ap.add_argument("--val-examples", type=int, default=5)
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    cfg = load_config(prepare(run_dir, load_config("demo").to_dict(), ["backbone", "search"]))
    run_search(cfg, run_dir)
    backbone = from_config(cfg.backbone)
    val = for_search(cfg.search.data, backbone.tokenizer, val_only=True).val[: args.val_examples]
    batches = make_batches(val, backbone.tokenizer.pad_token_id, len(val))
    gated = GatedLoRA.load(backbone.model, backbone.layout, run_dir / "search" / "adapter")
    layout = backbone.layout
    n_tokens = sum(b.n_scored for b in batches)

    def study(method: str) -> Study:
        names = {f"{k}.{n}": layout.module_name(k, n) for k, n in layout.all_modules()}
        return Study(method, layout.kinds, layout.num_layers, names, len(batches), n_tokens)

    print(
        f"backbone {backbone.identity['source']} ({layout.num_layers} layers x {len(layout.kinds)} kinds), "
        f"{len(val)} val examples, {sum(b.tokens for b in batches)} tokens, {n_tokens} response tokens, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    exact1, t_exact1, mem_exact = engine(study("ab-exact"), gated, batches, run_dir / "bench")
    print(f"cached exact (1st): {t_exact1:.1f} s, peak RSS +{mem_exact:.0f} MB", flush=True)
    with PeakRSS() as mem:
        start = time.perf_counter()
        reference = naive_ab(gated, batches)
        t_naive = time.perf_counter() - start
    passes = 2 + 2 * len(reference)
    print(f"naive: {t_naive:.1f} s ({passes} passes, {t_naive / passes:.2f} s each), peak RSS +{mem.mb:.0f} MB")
    exact2, t_exact2, _ = engine(study("ab-exact"), gated, batches, run_dir / "bench")
    print(f"cached exact (2nd): {t_exact2:.1f} s", flush=True)
    first, t_first, mem_first = engine(study("ab-first-order"), gated, batches, run_dir / "bench")
    print(f"first-order: {t_first:.1f} s, peak RSS +{mem_first:.0f} MB", flush=True)

    keys = list(reference)
    t_exact = (t_exact1 + t_exact2) / 2
    diff = max(max(abs(exact1[k] - reference[k]), abs(exact2[k] - reference[k])) for k in keys)
    rho = float(stats.spearmanr([first[k] for k in keys], [exact1[k] for k in keys]).statistic)
    sign = sum((first[k] > 0) == (exact1[k] > 0) for k in keys) / len(keys)
    print(f"exact speed-up {t_naive / t_exact:.2f}x (mean of {t_exact1:.1f} s and {t_exact2:.1f} s)")
    print(f"first-order speed-up {t_naive / t_first:.1f}x; Spearman vs exact {rho:.3f}; same sign {sign:.0%}")
    print(
        f"RESULT exact_speedup={t_naive / t_exact:.2f} max_abs_diff={diff:.2e} "
        f"first_order_speedup={t_naive / t_first:.1f} spearman_first_order={rho:.3f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
