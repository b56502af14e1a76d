"""The benchmarks' summary of per-round ratios: geometric mean and a t-interval over rounds."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from fanlora.latency.timing import ratio_interval


def test_ratio_interval_is_a_t_interval_of_log_ratios():
    ratios = [0.90, 0.95, 1.00, 0.97]
    got = ratio_interval(ratios)
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / 4
    half = stats.t.ppf(0.975, 3) * stats.tstd(logs) / 2
    assert got["mean"] == pytest.approx(math.exp(mean))
    assert (got["low"], got["high"]) == pytest.approx((math.exp(mean - half), math.exp(mean + half)))
    assert got["low"] < 0.95 < got["high"]


def test_ratio_interval_of_one_round_has_no_width():
    got = ratio_interval([0.9])
    assert got["mean"] == pytest.approx(0.9) and math.isnan(got["low"]) and math.isnan(got["high"])
