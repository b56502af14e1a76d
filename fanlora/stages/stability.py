"""Score stability: stage a + scoring under several seeds (the paper's Table 4), or one stage a scored on two
disjoint halves of the val examples (the scoring noise alone), then their agreement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fanlora import atomic
from fanlora.config import Config, load_config
from fanlora.dist import say
from fanlora.errors import UserError
from fanlora.scoring.compare import compare
from fanlora.stages import rundir
from fanlora.stages.score import run_score
from fanlora.stages.search import run_search


def run_stability(cfg: Config, run_dir: str | Path, seeds: list[int]) -> Any:
    """Stage a + scoring under each seed (``<run_dir>/seed-<s>``), then their agreement (the paper's Table 4)."""
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"stability needs at least two different seeds, got {seeds}: e.g. --seeds 0 1 2")
    tables, names = [], []
    for seed in seeds:
        sub = Path(run_dir) / f"seed-{seed}"
        seeded = cfg.to_dict()
        seeded["search"]["train"]["seed"] = seed
        seeded = load_config(rundir.prepare(sub, seeded, ["backbone", "search", "score"]))
        say(f"stability: seed {seed} → {sub}")
        run_search(seeded, sub)
        tables.append(run_score(seeded, sub))
        names.append(f"seed {seed}")
    result = compare(tables, names, cfg.select.k_max)
    atomic.write_json(
        Path(run_dir) / "stability.json", {"seeds": seeds, "method": cfg.score.method, **result.to_dict()}
    )
    atomic.write_text(Path(run_dir) / "stability.md", result.markdown() + "\n")
    return result


def run_split_half(cfg: Config, run_dir: str | Path, seed: int) -> Any:
    """One stage-a run (``<run_dir>/seed-<s>``) scored on two disjoint halves of the val examples
    (``score.max_val_examples`` each: the first N, then the next N), then their agreement.

    Seeds differ in training *and* scoring noise; two halves of the val data under one adapter show the
    scoring noise alone, so the pair of numbers says which of the two limits stability.
    """
    n = cfg.score.max_val_examples
    if not n:
        raise UserError(
            "--split-half needs score.max_val_examples (each half's size), e.g. --set score.max_val_examples=16"
        )
    sub = Path(run_dir) / f"seed-{seed}"
    seeded = cfg.to_dict()
    seeded["search"]["train"]["seed"] = seed
    seeded["score"]["val_start"] = 0
    seeded = load_config(rundir.prepare(sub, seeded, ["backbone", "search", "score"]))
    say(f"split-half: stage a under seed {seed} → {sub}")
    run_search(seeded, sub)
    tables = []
    for half in (0, 1):
        halved = seeded.to_dict()
        halved["score"]["val_start"] = half * n
        where = sub / f"half-{half}"
        halved = load_config(rundir.prepare(where, halved, ["backbone", "search", "score"]))
        if not (where / "search").exists():
            (where / "search").symlink_to(Path("..") / "search")  # the same stage-a adapter
        say(f"split-half: val examples {half * n}..{half * n + n - 1} → {where}")
        tables.append(run_score(halved, where))
    result = compare(tables, ["val half 0", "val half 1"], cfg.select.k_max)
    record = {"seed": seed, "method": cfg.score.method, "examples_per_half": n, **result.to_dict()}
    atomic.write_json(Path(run_dir) / "split-half.json", record)
    atomic.write_text(Path(run_dir) / "split-half.md", result.markdown() + "\n")
    return result
