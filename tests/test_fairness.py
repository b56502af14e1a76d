"""Max-min fair shares of a forward's token budget and of the batch's rows (fanlora.serving.fairness)."""

from __future__ import annotations

from fanlora.serving.fairness import fair_shares, next_to_join, victim, water_fill


def test_water_fill_gives_small_demands_all_and_splits_the_rest_evenly():
    assert water_fill([4, 1000, 1000], 100) == [4, 48, 48]
    assert water_fill([10, 10], 100) == [10, 10]  # never more than asked
    assert water_fill([5, 5, 5], 7) == [3, 2, 2]  # left-over tokens to the earliest
    assert water_fill([0, 9], 4) == [0, 4] and water_fill([3], 0) == [0]


def test_shares_are_fair_across_tenants_before_prompts():
    items = ["a1", "a2", "a3", "a4", "b1"]  # tenant a's burst of four long prompts, tenant b's short one
    tenant = {"a1": "a", "a2": "a", "a3": "a", "a4": "a", "b1": "b"}
    need = {"a1": 1000, "a2": 1000, "a3": 1000, "a4": 1000, "b1": 4}
    shares = fair_shares(items, tenant, need, 256)
    assert shares["b1"] == 4 and sum(shares.values()) == 256
    assert [shares[k] for k in ("a1", "a2", "a3", "a4")] == [63, 63, 63, 63]
    # two tenants, both long: half each, whatever the number of prompts each sent
    shares = fair_shares(["a1", "a2", "a3", "b1"], tenant, {"a1": 500, "a2": 500, "a3": 500, "b1": 500}, 100)
    assert shares["b1"] == 50 and shares["a1"] + shares["a2"] + shares["a3"] == 50


def test_the_tenant_holding_fewest_rows_joins_first_and_only_it_may_preempt():
    tenant = {"a1": "a", "a2": "a"}
    assert next_to_join(["a", "b"], {"a": 2}) == 1
    assert next_to_join(["a", "b"], {"a": 1, "b": 1}) == 0  # ties: first come
    assert victim(["a1", "a2"], tenant, {"a": 2}, "b") == "a2"  # the latest prompt of the largest holder
    assert victim(["a1", "a2"], tenant, {"a": 2}, "a") is None  # a holds rows: no preemption for it
    assert victim(["a1"], tenant, {"a": 1, "b": 1}, "c") is None  # nobody holds more than one row
