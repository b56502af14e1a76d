"""Paired comparisons of two methods on the same test items under the same seeds.

A comparison of A with B is the mean over items and seeds of the per-(seed, item) difference A − B, with:

- **p-value**: ``scipy.stats.permutation_test`` on the per-item differences averaged over seeds, with
  sign flips (``permutation_type="samples"`` on one sample), two-sided: under "no difference" each item's
  difference is as likely to have either sign;
- **item interval**: ``scipy.stats.bootstrap`` (BCa, 95 %) of the same per-item differences — the
  uncertainty from which test items were drawn, seeds held fixed;
- **seed-and-item interval**: a two-way percentile bootstrap that resamples seeds *and* items — seed as a
  random effect (a seed changes the adapter's initialisation and the data order). scipy's ``bootstrap``
  resamples along one axis only, so this one is written here (numpy, fixed generator seed).

The verdict uses the union of the two intervals (never narrower than either): **win** / **loss** when it
excludes zero (in the direction the metric improves), **tie** when it covers zero.

**Against a rule** (e.g. "a random setting of K_max = 2 per layer"), A meets several of the rule's draws, each
a *setting* trained and scored on the same items: :func:`compare_to_pool` takes A − (each draw) per item and
resamples draws *and* items (the draw is the random effect: five settings say more about the rule than one),
and ranks A among the draws — with n draws the smallest rank p-value is 1/(n+1), the resolution the pool has.

Identical inputs give a zero difference with a zero-width interval (a tie) and p = 1; item sets or seeds
that differ between A and B are refused — an unpaired comparison is not what this module computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

Outcomes = Mapping[int, Mapping[str, float]]  # seed → item id → value


@dataclass
class Comparison:
    a: str
    b: str
    metric: str
    higher_is_better: bool
    n_items: int
    n_seeds: int
    mean_a: float
    mean_b: float
    mean_diff: float  # A − B
    ci_low: float  # seed-and-item bootstrap, 95 %
    ci_high: float
    ci_items_low: float  # item bootstrap (BCa), seeds fixed
    ci_items_high: float
    p_value: float
    verdict: str  # "win" | "tie" | "loss" for A against B

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.a} vs {self.b} ({self.metric}, {self.n_items} items × {self.n_seeds} seeds): "
            f"{self.mean_diff:+.4f} [{self.ci_low:+.4f}, {self.ci_high:+.4f}] p={self.p_value:.3g} → {self.verdict}"
        )


def matrix(outcomes: Outcomes, seeds: list[int], items: list[str]) -> np.ndarray:
    return np.array([[float(outcomes[s][i]) for i in items] for s in seeds], dtype=np.float64)


def _aligned(a: Outcomes, b: Outcomes, names: tuple[str, str]) -> tuple[list[int], list[str]]:
    if sorted(a) != sorted(b):
        raise ValueError(f"{names[0]} and {names[1]} were run under different seeds ({sorted(a)} vs {sorted(b)})")
    seeds = sorted(a)
    if not seeds:
        raise ValueError("no seeds to compare")
    items = sorted(a[seeds[0]])
    for s in seeds:
        for side, name in ((a, names[0]), (b, names[1])):
            if sorted(side[s]) != items:
                raise ValueError(
                    f"unpaired items: {name} under seed {s} has {len(side[s])} items that are not the "
                    f"{len(items)} of {names[0]} under seed {seeds[0]}"
                )
    if not items:
        raise ValueError("no items to compare")
    return seeds, items


def two_way_interval(
    diff: np.ndarray, level: float = 0.95, resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap of the grand mean of ``diff`` [seeds, items], resampling both axes."""
    rng = np.random.default_rng(seed)
    n_s, n_i = diff.shape
    means = np.empty(resamples)
    for k in range(resamples):
        rows = rng.integers(0, n_s, n_s)
        cols = rng.integers(0, n_i, n_i)
        means[k] = diff[np.ix_(rows, cols)].mean()
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def compare(
    a: Outcomes,
    b: Outcomes,
    names: tuple[str, str] = ("A", "B"),
    metric: str = "value",
    higher_is_better: bool = True,
    resamples: int = 4000,
) -> Comparison:
    """A against B on the same (seed, item) pairs; see the module docstring for what each number means."""
    seeds, items = _aligned(a, b, names)
    ma, mb = matrix(a, seeds, items), matrix(b, seeds, items)
    diff = ma - mb
    per_item = diff.mean(axis=0)
    mean = float(diff.mean())
    if np.ptp(per_item) == 0 and np.ptp(diff) == 0:  # no spread at all: nothing to resample
        lo = hi = ilo = ihi = mean
        p = 1.0 if mean == 0 else 0.0
    else:
        lo, hi = two_way_interval(diff, resamples=resamples)
        if np.ptp(per_item) == 0:
            ilo = ihi = float(per_item[0])
        else:
            boot = sps.bootstrap(
                (per_item,), np.mean, confidence_level=0.95, n_resamples=resamples, method="BCa",
                random_state=np.random.default_rng(1),
            )  # fmt: skip
            ilo, ihi = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
            if not (math.isfinite(ilo) and math.isfinite(ihi)):  # BCa can fail on near-degenerate data
                ilo, ihi = (float(x) for x in np.quantile(per_item, [0.025, 0.975]))
        test = sps.permutation_test(
            (per_item,), np.mean, permutation_type="samples", n_resamples=min(resamples, 9999),
            alternative="two-sided", random_state=np.random.default_rng(2),
        )  # fmt: skip
        p = float(test.pvalue)
    if min(lo, ilo) <= 0 <= max(hi, ihi):
        verdict = "tie"
    else:
        better = (mean > 0) == higher_is_better
        verdict = "win" if better else "loss"
    return Comparison(
        a=names[0],
        b=names[1],
        metric=metric,
        higher_is_better=higher_is_better,
        n_items=len(items),
        n_seeds=len(seeds),
        mean_a=float(ma.mean()),
        mean_b=float(mb.mean()),
        mean_diff=mean,
        ci_low=lo,
        ci_high=hi,
        ci_items_low=ilo,
        ci_items_high=ihi,
        p_value=p,
        verdict=verdict,
    )


def seed_spread(outcomes: Outcomes) -> dict[str, float]:
    """How much seeds differ: per-seed means, and the share of items whose outcome changes across seeds."""
    seeds = sorted(outcomes)
    items = sorted(outcomes[seeds[0]])
    m = matrix(outcomes, seeds, items)
    per_seed = m.mean(axis=1)
    changes = float((np.ptp(m, axis=0) > 1e-12).mean()) if len(seeds) > 1 else 0.0
    return {
        "seed_means_min": float(per_seed.min()),
        "seed_means_max": float(per_seed.max()),
        "item_sd_across_seeds": float(m.std(axis=0, ddof=1).mean()) if len(seeds) > 1 else 0.0,
        "items_that_change_across_seeds": changes,
    }


@dataclass
class PoolComparison:
    a: str
    pool: str
    members: list[str]
    metric: str
    higher_is_better: bool
    n_items: int
    mean_a: float
    member_means: list[float]
    mean_diff: float  # A − the mean of the members
    ci_low: float  # two-way bootstrap over members and items, 95 %
    ci_high: float
    better_members: int  # members that do at least as well as A
    p_rank: float  # (1 + better_members) / (1 + members): how often a draw of the rule matches A
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_to_pool(
    a: Outcomes,
    pool: Mapping[str, Outcomes],
    names: tuple[str, str] = ("A", "pool"),
    metric: str = "value",
    higher_is_better: bool = True,
    resamples: int = 4000,
) -> PoolComparison:
    """A against the draws of a rule, each paired with A item by item (seeds averaged per item)."""
    if len(pool) < 2:
        raise ValueError(f"a pool needs at least 2 members, got {len(pool)}")
    rows = []
    for member, outcomes in pool.items():
        seeds, items = _aligned(a, outcomes, (names[0], member))
        rows.append(matrix(outcomes, seeds, items).mean(axis=0))
    a_item = matrix(a, seeds, items).mean(axis=0)
    diff = a_item[None, :] - np.array(rows)
    mean = float(diff.mean())
    lo, hi = (mean, mean) if np.ptp(diff) == 0 else two_way_interval(diff, resamples=resamples)
    member_means = [float(r.mean()) for r in rows]
    sign = 1 if higher_is_better else -1
    better = sum(sign * (m - float(a_item.mean())) >= 0 for m in member_means)
    verdict = "tie" if lo <= 0 <= hi else ("win" if (mean > 0) == higher_is_better else "loss")
    return PoolComparison(
        a=names[0],
        pool=names[1],
        members=list(pool),
        metric=metric,
        higher_is_better=higher_is_better,
        n_items=len(items),
        mean_a=float(a_item.mean()),
        member_means=member_means,
        mean_diff=mean,
        ci_low=lo,
        ci_high=hi,
        better_members=better,
        p_rank=(1 + better) / (1 + len(rows)),
        verdict=verdict,
    )
