"""Paired comparisons of two methods on the same test items under the same seeds, resampling what is independent.

Test items are rarely independent draws: SQL questions come from a few dozen question intents, BoolQ questions
share passages, MMLU items share subjects; within such a *cluster* the paired difference between two settings
tends to have one sign, so an interval that resamples items one by one is too narrow. Training seeds are a
second source of variation: a seed changes the adapter's initialisation and data order. So a comparison of A
with B — the mean over (seed, item) of the difference A − B — reports:

- **interval** (``ci_low``/``ci_high``, what the verdict uses): a percentile bootstrap that resamples training
  seeds and, independently, whole clusters of items (a crossed two-way bootstrap, item-weighted: the mean of a
  resample is the sum of its clusters' differences over their item count). Seeds are a random effect: with
  one seed that axis contributes nothing, and the report says one seed ran. Without cluster keys every item
  is its own cluster;
- **item interval** (``ci_items_*``): ``scipy.stats.bootstrap`` (BCa, 95 %) of the per-item differences,
  seeds held fixed and items treated as independent — shown beside the clustered one so a reader sees how
  much the clustering widens it;
- **p-value**: ``scipy.stats.permutation_test`` flipping the sign of whole clusters (the cluster's summed
  difference, averaged over seeds): under "no difference" each cluster's difference is as likely to have
  either sign. Exact when the clusters are few enough to enumerate.

**Verdict**: **win** / **loss** when the clustered interval excludes zero (in the direction the metric
improves), **tie** when it covers zero. With fewer than :data:`FEW_CLUSTERS` clusters the bootstrap's
interval is rough (it under-covers), and :attr:`Comparison.note` says so.

scipy's ``bootstrap`` resamples along one axis of independent observations only; the crossed seed × cluster
resampling is therefore written here (numpy, vectorised, fixed generator seed). Its coverage is checked by
simulation in ``tests/test_stats.py`` (zero effect, strong within-cluster correlation: the clustered interval
covers zero about 95 % of the time, the item-level one far less).

**Against a rule** (e.g. "a random setting of K_max = 2 per layer"), A meets several of the rule's draws, each
a *setting* trained and scored on the same items: :func:`compare_to_pool` takes A − (each draw) per item and
resamples draws *and* clusters (the draw is the random effect), and ranks A among the draws — with n draws the
smallest rank p-value is 1/(n+1), the resolution the pool has.

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
Clusters = Mapping[str, str]  # item id → cluster key (a template, passage, subject…)

FEW_CLUSTERS = 10  # below this many clusters the percentile bootstrap's interval is rough


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
    ci_low: float  # clusters (and seeds) resampled, 95 %: what the verdict uses
    ci_high: float
    ci_items_low: float  # items as independent, seeds fixed (BCa)
    ci_items_high: float
    p_value: float  # sign flips of whole clusters
    verdict: str  # "win" | "tie" | "loss" for A against B
    n_clusters: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return comparison_line(self.to_dict(), bold=False)


def design(n_items: int, n_clusters: int, n_seeds: int, seeds_word: str = "seed") -> str:
    """'402 items in 22 clusters × 1 seed' — the units a comparison resampled."""
    clusters = "" if n_clusters in (0, n_items) else f" in {n_clusters} clusters"
    return f"{n_items} items{clusters} × {n_seeds} {seeds_word}{'s' if n_seeds != 1 else ''}"


def comparison_line(c: Mapping[str, Any], bold: bool = True) -> str:
    """One comparison as text: the clustered interval with its width, the item-level one, p and the verdict."""
    n_clusters = c.get("n_clusters") or c["n_items"]
    text = (
        f"{c['a']} vs {c['b']} ({c['metric']}, {design(c['n_items'], n_clusters, c['n_seeds'])}): "
        f"{c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] (width {c['ci_high'] - c['ci_low']:.4f}"
    )
    if n_clusters != c["n_items"]:
        text += f"; items as independent [{c['ci_items_low']:+.4f}, {c['ci_items_high']:+.4f}]"
    mark = "**" if bold else ""
    text += f"), p = {c['p_value']:.3g} → {mark}{c['verdict']}{mark}"
    return text + (f" ({c['note']})" if c.get("note") else "")


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


def cluster_labels(items: list[str], clusters: Clusters | None) -> np.ndarray:
    """An integer cluster label per item (each item its own cluster when ``clusters`` is None)."""
    if clusters is None:
        return np.arange(len(items))
    missing = [i for i in items if i not in clusters]
    if missing:
        raise ValueError(f"no cluster key for {len(missing)} items (e.g. {missing[0]!r})")
    keys: dict[str, int] = {}
    return np.array([keys.setdefault(str(clusters[i]), len(keys)) for i in items])


def _counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``rows`` multinomial resamples of n units: how often each unit was drawn, shape [rows, n]."""
    draws = rng.integers(0, n, (rows, n))
    out = np.zeros((rows, n))
    np.add.at(out, (np.arange(rows)[:, None], draws), 1.0)
    return out


def clustered_interval(
    diff: np.ndarray, labels: np.ndarray, level: float = 0.95, resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap of the grand mean of ``diff`` [seeds, items]: seeds and whole clusters resampled
    independently (crossed), each resample's mean weighted by the items its clusters hold."""
    rng = np.random.default_rng(seed)
    n_s = diff.shape[0]
    n_c = int(labels.max()) + 1
    sums = np.zeros((n_s, n_c))
    np.add.at(sums, (slice(None), labels), diff)  # per seed, per cluster: the summed difference
    sizes = np.bincount(labels, minlength=n_c).astype(np.float64)
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # chunks keep the [resamples, clusters] count matrix small
        k = min(500, resamples - start)
        w_s, w_c = _counts(rng, k, n_s), _counts(rng, k, n_c)
        means[start : start + k] = ((w_s @ sums) * w_c).sum(axis=1) / (n_s * (w_c @ sizes))
    if n_c > 1:  # small-sample correction, as for cluster-robust errors (G − 1 degrees of freedom): the
        # bootstrap's variance is (C − 1)/C of the unbiased one, and a t quantile stands for the normal one
        centre = float(diff.mean())
        z = sps.norm.ppf(1 - (1 - level) / 2)
        widen = math.sqrt(n_c / (n_c - 1)) * float(sps.t.ppf(1 - (1 - level) / 2, n_c - 1)) / z
        means = centre + (means - centre) * widen
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def item_interval(per_item: np.ndarray, resamples: int = 4000) -> tuple[float, float]:
    """BCa interval of the mean of independent per-item values; the percentile one where BCa cannot be formed."""
    if np.ptp(per_item) == 0:
        return float(per_item[0]), float(per_item[0])
    for method in ("BCa", "percentile"):  # BCa fails (non-finite) on near-degenerate data
        boot = sps.bootstrap(
            (per_item,), np.mean, confidence_level=0.95, n_resamples=resamples, method=method,
            random_state=np.random.default_rng(1),
        )  # fmt: skip
        lo, hi = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
    mean = float(per_item.mean())
    return mean, mean


def cluster_sign_flip_p(per_item: np.ndarray, labels: np.ndarray, resamples: int = 9999) -> float:
    """Two-sided p of "no difference": the signs of whole clusters' summed differences flipped at random."""
    sums = np.bincount(labels, weights=per_item)
    if not np.any(sums):
        return 1.0
    test = sps.permutation_test(
        (sums,), lambda x, axis: np.sum(x, axis=axis), permutation_type="samples", vectorized=True,
        n_resamples=resamples, alternative="two-sided", random_state=np.random.default_rng(2),
    )  # fmt: skip
    return float(test.pvalue)


def verdict_of(lo: float, hi: float, mean: float, higher_is_better: bool) -> str:
    if lo <= 0 <= hi:
        return "tie"
    return "win" if (mean > 0) == higher_is_better else "loss"


def _note(n_clusters: int, n_seeds: int, seeds_word: str = "seed") -> str:
    parts = []
    if n_clusters < FEW_CLUSTERS:
        parts.append(f"only {n_clusters} clusters: the interval is rough")
    if n_seeds == 1:
        parts.append(f"one {seeds_word}: {seeds_word} variation not counted")
    return "; ".join(parts)


def compare(
    a: Outcomes,
    b: Outcomes,
    names: tuple[str, str] = ("A", "B"),
    metric: str = "value",
    higher_is_better: bool = True,
    resamples: int = 4000,
    clusters: Clusters | None = None,
) -> Comparison:
    """A against B on the same (seed, item) pairs; see the module docstring for what each number means."""
    seeds, items = _aligned(a, b, names)
    labels = cluster_labels(items, clusters)
    ma, mb = matrix(a, seeds, items), matrix(b, seeds, items)
    diff = ma - mb
    per_item = diff.mean(axis=0)
    mean = float(diff.mean())
    if np.ptp(diff) == 0:  # the same difference everywhere: nothing to resample
        lo = hi = ilo = ihi = mean
    else:
        lo, hi = clustered_interval(diff, labels, resamples=resamples)
        ilo, ihi = item_interval(per_item, resamples)
    n_clusters = int(labels.max()) + 1
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
        p_value=cluster_sign_flip_p(per_item, labels, min(resamples, 9999)),
        verdict=verdict_of(lo, hi, mean, higher_is_better),
        n_clusters=n_clusters,
        note=_note(n_clusters, len(seeds)),
    )


def mean_interval(outcomes: Outcomes, clusters: Clusters | None = None) -> tuple[float, float, float]:
    """(mean, low, high) of one group's outcomes, seeds and clusters resampled — for figures."""
    seeds = sorted(outcomes)
    items = sorted(outcomes[seeds[0]])
    m = matrix(outcomes, seeds, items)
    if np.ptp(m) == 0:
        return float(m.mean()), float(m.mean()), float(m.mean())
    lo, hi = clustered_interval(m, cluster_labels(items, clusters), resamples=2000)
    return float(m.mean()), lo, hi


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
    ci_low: float  # bootstrap over members and clusters, 95 %
    ci_high: float
    better_members: int  # members that do at least as well as A
    p_rank: float  # (1 + better_members) / (1 + members): how often a draw of the rule matches A
    verdict: str
    n_clusters: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_to_pool(
    a: Outcomes,
    pool: Mapping[str, Outcomes],
    names: tuple[str, str] = ("A", "pool"),
    metric: str = "value",
    higher_is_better: bool = True,
    resamples: int = 4000,
    clusters: Clusters | None = None,
) -> PoolComparison:
    """A against the draws of a rule, each paired with A item by item (seeds averaged per item)."""
    if len(pool) < 2:
        raise ValueError(f"a pool needs at least 2 members, got {len(pool)}")
    rows = []
    for member, outcomes in pool.items():
        seeds, items = _aligned(a, outcomes, (names[0], member))
        rows.append(matrix(outcomes, seeds, items).mean(axis=0))
    labels = cluster_labels(items, clusters)
    a_item = matrix(a, seeds, items).mean(axis=0)
    diff = a_item[None, :] - np.array(rows)
    mean = float(diff.mean())
    lo, hi = (mean, mean) if np.ptp(diff) == 0 else clustered_interval(diff, labels, resamples=resamples)
    member_means = [float(r.mean()) for r in rows]
    sign = 1 if higher_is_better else -1
    better = sum(sign * (m - float(a_item.mean())) >= 0 for m in member_means)
    n_clusters = int(labels.max()) + 1
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
        verdict=verdict_of(lo, hi, mean, higher_is_better),
        n_clusters=n_clusters,
        note=f"only {n_clusters} clusters: the interval is rough" if n_clusters < FEW_CLUSTERS else "",
    )
