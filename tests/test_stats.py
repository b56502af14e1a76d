"""Paired statistics: a known difference is found, identical inputs tie with zero width, unpaired is refused."""

from __future__ import annotations

import numpy as np
import pytest

from fanlora.experiments.stats import compare, seed_spread


def outcomes(values: np.ndarray) -> dict[int, dict[str, float]]:
    return {s: {f"item{i}": float(v) for i, v in enumerate(row)} for s, row in enumerate(values)}


def test_a_known_difference_is_detected_with_its_size():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.5, size=(3, 400))  # per-item losses under 3 seeds
    better = base - 0.1 + rng.normal(0, 0.05, size=base.shape)  # 0.1 lower loss on every item
    c = compare(outcomes(better), outcomes(base), ("ab", "random"), "gold_nll", higher_is_better=False)
    assert c.mean_diff == pytest.approx(-0.1, abs=0.01)
    assert c.ci_high < 0 and c.ci_items_high < 0 and c.verdict == "win" and c.p_value < 0.001
    worse = compare(outcomes(base), outcomes(better), ("random", "ab"), "gold_nll", higher_is_better=False)
    assert worse.verdict == "loss" and worse.mean_diff == pytest.approx(0.1, abs=0.01)


def test_noise_without_a_difference_is_a_tie():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, size=(3, 200))
    b = rng.integers(0, 2, size=(3, 200))
    c = compare(outcomes(a), outcomes(b), metric="correct")
    assert c.verdict == "tie" and c.ci_low < 0 < c.ci_high and c.p_value > 0.05


def test_identical_inputs_are_a_zero_width_tie():
    values = np.random.default_rng(2).normal(size=(2, 50))
    c = compare(outcomes(values), outcomes(values.copy()))
    assert c.mean_diff == 0 and c.ci_low == c.ci_high == 0 and c.verdict == "tie" and c.p_value == 1.0


def test_unpaired_items_or_seeds_are_refused():
    a = outcomes(np.zeros((2, 5)))
    b = outcomes(np.zeros((2, 5)))
    b[1]["item9"] = b[1].pop("item4")
    with pytest.raises(ValueError, match="unpaired items"):
        compare(a, b)
    with pytest.raises(ValueError, match="different seeds"):
        compare(a, outcomes(np.zeros((3, 5))))


def test_seed_spread_counts_items_that_change():
    m = np.array([[1, 0, 1, 1], [1, 1, 1, 0]])
    spread = seed_spread(outcomes(m))
    assert spread["items_that_change_across_seeds"] == 0.5 and spread["seed_means_min"] == 0.75


def test_a_rule_pool_is_a_random_effect():
    from fanlora.experiments.stats import compare_to_pool

    rng = np.random.default_rng(3)
    items = rng.normal(2.0, 0.5, size=(1, 400))
    # five draws of a rule: each its own offset (setting effect) plus item noise; A 0.1 below their mean
    draws = [items + off + rng.normal(0, 0.05, items.shape) for off in (-0.03, 0.0, 0.02, 0.04, -0.01)]
    pool = {f"r{k}": outcomes(d) for k, d in enumerate(draws)}
    a = outcomes(items - 0.1 + 0.004)
    c = compare_to_pool(a, pool, ("ab", "random"), "gold_nll", higher_is_better=False)
    assert c.mean_diff == pytest.approx(-0.1, abs=0.01) and c.verdict == "win"
    assert c.better_members == 0 and c.p_rank == pytest.approx(1 / 6)
    # the interval carries the spread between draws: wider than the item-only interval against their mean
    single = compare(a, outcomes(np.mean(draws, axis=0)), metric="gold_nll", higher_is_better=False)
    assert (c.ci_high - c.ci_low) > (single.ci_items_high - single.ci_items_low)
    # A in the middle of the pool: a tie, and its rank says so
    mid = compare_to_pool(pool["r1"], {k: v for k, v in pool.items() if k != "r1"}, metric="gold_nll",
                          higher_is_better=False)  # fmt: skip
    assert mid.verdict == "tie" and mid.better_members == 2
    same = compare_to_pool(a, {"x": a, "y": a}, metric="gold_nll", higher_is_better=False)
    assert same.mean_diff == 0 and same.ci_low == same.ci_high == 0 and same.verdict == "tie"
    with pytest.raises(ValueError, match="unpaired items"):
        compare_to_pool(a, {"x": a, "y": outcomes(items[:, :399])})
    with pytest.raises(ValueError, match="at least 2 members"):
        compare_to_pool(a, {"x": a})


def test_fanlora_compare_pairs_two_evaluations_item_by_item(tmp_path, capsys):
    import json

    from helpers import fail

    from fanlora.cli import main

    def folder(name: str, values: dict[str, float], key: str = "value") -> str:
        (tmp_path / name).mkdir()
        lines = [json.dumps({"id": i, key: v, "gold_nll": 1 - v / 2}) for i, v in values.items()]
        (tmp_path / name / "items.jsonl").write_text("\n".join(lines))
        return str(tmp_path / name)

    rng = np.random.default_rng(4)
    right = rng.integers(0, 2, 300)
    a = folder("a", {f"q{i}": float(max(v, i % 4 == 0)) for i, v in enumerate(right)})  # A gets a quarter more right
    b = folder("b", {f"q{i}": float(v) for i, v in enumerate(right)})
    assert main(["compare", a, b, "--out", str(tmp_path / "c.json")]) == 0
    line = capsys.readouterr().out
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["verdict"] == "win" and c["mean_diff"] > 0.05 and c["n_items"] == 300 and "→ win" in line
    assert main(["compare", a, b, "--metric", "gold_nll"]) == 0 and "→ win" in capsys.readouterr().out
    short = folder("short", {f"q{i}": 1.0 for i in range(299)})
    assert "unpaired items" in fail(capsys, ["compare", a, short])
    assert "has no items.jsonl" in fail(capsys, ["compare", a, str(tmp_path)])
    bare = folder("bare", {"q0": 1.0}, key="other")
    assert "holds no 'value' per item" in fail(capsys, ["compare", bare, a])


def _clustered_null(rng: np.random.Generator, n_clusters: int = 25, size: int = 16, seeds: int = 1):
    """Paired differences with no effect but a strong cluster effect (SD 1) over item noise (SD 0.5)."""
    labels = np.repeat(np.arange(n_clusters), size)
    diff = rng.normal(0, 1, n_clusters)[labels][None, :] + rng.normal(0, 0.5, (seeds, labels.size))
    return diff, labels


def test_clustered_interval_covers_a_zero_effect_at_its_level_and_the_item_level_one_does_not():
    from fanlora.experiments.stats import clustered_interval, item_interval

    rng = np.random.default_rng(10)
    reps, clustered, naive = 300, 0, 0
    for r in range(reps):
        diff, labels = _clustered_null(rng)
        lo, hi = clustered_interval(diff, labels, resamples=1000, seed=r)
        clustered += lo <= 0 <= hi
        ilo, ihi = item_interval(diff[0], resamples=500)
        naive += ilo <= 0 <= ihi
    assert 0.90 <= clustered / reps <= 0.99  # about 95 % (measured 0.944 over 1,000 repetitions)
    assert naive / reps < 0.6  # items as independent: far too narrow (measured 0.375)


def test_seeds_are_resampled_as_a_random_effect():
    from fanlora.experiments.stats import clustered_interval

    rng = np.random.default_rng(11)
    reps, covered = 200, 0
    for r in range(reps):
        diff, labels = _clustered_null(rng, seeds=3)
        diff += rng.normal(0, 0.3, (3, 1))  # each training seed shifts every item
        lo, hi = clustered_interval(diff, labels, resamples=1000, seed=r)
        covered += lo <= 0 <= hi
    assert covered / reps >= 0.90


def test_a_known_effect_is_found_through_the_clusters():
    rng = np.random.default_rng(12)
    diff, labels = _clustered_null(rng, n_clusters=40)
    diff = diff * 0.2 + 0.25  # a real 0.25 gain, cluster effects of SD 0.2
    ids = [f"q{i}" for i in range(labels.size)]
    clusters = {i: f"intent{c}" for i, c in zip(ids, labels, strict=True)}
    b = {0: {i: 0.0 for i in ids}}
    a = {0: {i: float(v) for i, v in zip(ids, diff[0], strict=True)}}
    c = compare(a, b, ("ab", "vo"), clusters=clusters)
    assert c.verdict == "win" and c.n_clusters == 40 and c.ci_low > 0 and c.p_value < 0.01
    assert (c.ci_high - c.ci_low) > 1.5 * (c.ci_items_high - c.ci_items_low)  # clustering widens it
    assert "640 items in 40 clusters × 1 seed" in c.line() and "one seed" in c.note


def test_few_clusters_are_named_and_whole_clusters_flip_in_the_permutation_test():
    ids = [f"q{i}" for i in range(60)]
    clusters = {i: f"t{n % 4}" for n, i in enumerate(ids)}
    a = {0: {i: 1.0 for i in ids}}
    b = {0: {i: 0.0 for i in ids}}
    c = compare(a, b, clusters=clusters)
    # a constant difference over 4 clusters: the exact sign-flip p is 2 / 2**4, never 0
    assert c.p_value == pytest.approx(2 / 16) and "only 4 clusters" in c.note
    unclustered = compare(a, b)
    assert 0 < unclustered.p_value < 0.001 and unclustered.verdict == "win"


def test_the_item_interval_falls_back_to_bootstrap_means_not_raw_quantiles():
    from fanlora.experiments.stats import item_interval

    values = np.zeros(200)
    values[0] = 1.0  # one non-zero item: BCa's acceleration cannot be formed
    lo, hi = item_interval(values, resamples=2000)
    assert 0 <= lo <= hi <= 0.03  # an interval for the mean (0.005), not the spread of the values (0 – 1)


def test_one_seed_is_said_and_missing_cluster_keys_are_refused():
    a = outcomes(np.array([[1.0, 0.0, 1.0]]))
    b = outcomes(np.array([[0.0, 0.0, 1.0]]))
    assert "× 1 seed)" in compare(a, b).line() and "seeds)" not in compare(a, b).line()
    with pytest.raises(ValueError, match="no cluster key for 1 items"):
        compare(a, b, clusters={"item0": "x", "item1": "x"})
