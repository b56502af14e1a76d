"""Every scorer against a plain computation of what it claims to compute, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BIG, gated_model, run_study, study_for, val_set
from tiny import make_tiny

from fanlora.data.collate import pad_batch
from fanlora.errors import UserError
from fanlora.scoring import ScoreTable, exact, make_batches, performance, shapley
from fanlora.scoring.journal import Journal
from fanlora.scoring.naive import naive_ab
from fanlora.scoring.rowgates import RowGates
from fanlora.scoring.study import assemble, compute


@pytest.fixture(scope="module")
def setup(tiny_llama_3layers):
    gated, pad = gated_model(tiny_llama_3layers)
    return gated, make_batches(val_set(), pad, 2), pad


def test_performance_matches_hf_loss(setup):
    gated, batches, pad = setup
    batch = pad_batch(val_set(), pad)
    with torch.no_grad():
        hf = -gated.model(**batch).loss.item()
    assert performance(gated, batches) == pytest.approx(hf, abs=1e-5)


@pytest.mark.parametrize("limit", [BIG, 1], ids=["cached", "chunked-one-kind-at-a-time"])
def test_cached_exact_engine_equals_naive_eq3(setup, tmp_path, limit):
    gated, batches, _ = setup
    table = run_study(study_for(gated, batches), gated, batches, tmp_path, limit)
    reference = naive_ab(gated, batches)
    assert max(abs(table.values[k] - v) for k, v in reference.items()) < 1e-5
    assert len({round(v, 6) for v in table.values.values()}) > 10  # the modules really differ
    gated.set_all(True)
    assert table.s_all == pytest.approx(performance(gated, batches), abs=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma"])
def test_cached_engine_on_other_architectures(arch, tmp_path):
    gated, pad = gated_model(make_tiny(tmp_path / arch, arch))
    batches = make_batches(val_set((7, 12, 9)), pad, 2)
    table = run_study(study_for(gated, batches), gated, batches, tmp_path)
    reference = naive_ab(gated, batches)
    assert max(abs(table.values[k] - v) for k, v in reference.items()) < 1e-5


def test_memory_plan_chunks_and_groups(setup):
    from fanlora.scoring import memory

    gated, batches, _ = setup
    config = gated.model.get_base_model().config
    assert memory.plan_chunks(config, batches, BIG, 4) == [(0, 3)]
    assert memory.plan_chunks(config, batches, 1, 4) == [(0, 1), (1, 2), (2, 3)]
    assert memory.group_size(config, batches, 7, BIG, 4, on_cpu=False) == 7
    assert memory.group_size(config, batches, 7, 1, 4, on_cpu=False) == 1
    assert memory.group_size(config, batches, 7, BIG, 4, on_cpu=True) == 7  # tiny batches: all kinds at once


def test_work_splits_cover_every_unit_once(setup):
    gated, batches, _ = setup
    parts = exact.assign_layers(30, 4)
    assert sorted(x for p in parts for x in p) == list(range(30))
    loads = [sum(30 - layer for layer in p) for p in parts]
    assert max(loads) - min(loads) <= 30  # balanced by cost, not by count
    s = study_for(gated, batches, "shapley", options={"budget": 5, "seed": 0})
    assert sorted(u for r in range(2) for u in s.units(r, 2)) == list(range(5))


def test_sharded_study_equals_one_process(setup, tmp_path):
    gated, batches, _ = setup
    one = run_study(study_for(gated, batches), gated, batches, tmp_path / "a")
    two = run_study(study_for(gated, batches), gated, batches, tmp_path / "b", world=2)
    assert one.values == pytest.approx(two.values, abs=1e-9)


def test_resume_recomputes_only_missing_entries(setup, tmp_path, monkeypatch):
    gated, batches, _ = setup
    study = study_for(gated, batches)
    full = run_study(study, gated, batches, tmp_path)
    partial = tmp_path / "scores.partial.0.jsonl"
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 2 + 21
    partial.write_text("\n".join(lines[:8]) + "\n" + lines[8][:10])  # 7 entries kept + a line cut by a kill
    recorded = []
    real = Journal.record
    monkeypatch.setattr(Journal, "record", lambda self, e: recorded.append(e["id"]) or real(self, e))
    again = run_study(study, gated, batches, tmp_path)
    assert len(recorded) == 24 - 1 - 7 and not set(recorded) & {json.loads(x)["id"] for x in lines[1:8]}
    assert again.values == pytest.approx(full.values, abs=1e-9)


def test_foreign_or_corrupt_partial_is_refused(tmp_path):
    (tmp_path / "scores.partial.1.jsonl").write_text(json.dumps({"format": "fanlora-scores-partial/2", "x": 2}) + "\n")
    with pytest.raises(UserError, match="partial scores of another run"):
        Journal(tmp_path, "scores", {"x": 1})
    (tmp_path / "scores.partial.1.jsonl").write_text(
        json.dumps({"format": "fanlora-scores-partial/2", "x": 1}) + "\nGARBAGE\n{}\n"
    )
    with pytest.raises(UserError, match="is corrupt"):
        Journal(tmp_path, "scores", {"x": 1})


def test_incomplete_entries_are_refused(setup, tmp_path):
    gated, batches, _ = setup
    study = study_for(gated, batches)
    progress = Journal(tmp_path, "scores", {})
    compute(study, gated, batches, progress, study.units(0, 2), BIG)  # half the layers only
    with pytest.raises(UserError, match="incomplete"):
        assemble(study, progress.done)


def test_entries_from_differently_chunked_runs_combine(setup, tmp_path):
    gated, batches, _ = setup
    study = study_for(gated, batches)
    whole = Journal(tmp_path / "a", "scores", {})
    compute(study, gated, batches, whole, [0, 1, 2], BIG)
    chunked = Journal(tmp_path / "b", "scores", {})
    compute(study, gated, batches, chunked, [0, 1, 2], 1)
    mixed = {k: v for k, v in chunked.done.items() if not k.endswith(".2")}
    mixed.update({k: v for k, v in whole.done.items() if k.endswith(".2")})
    assert assemble(study, mixed).values == pytest.approx(assemble(study, whole.done).values, abs=1e-6)


def _S_with_gate(gated, batches, key, value: float, everyone: float) -> float:
    """S with every gate at ``everyone`` and ``key``'s at ``value`` (real-valued gates)."""
    from fanlora.scoring.replay import Replayer

    rg = RowGates(gated)
    replayer = Replayer(gated.model.get_base_model(), gated.layout.layers_path)
    with torch.no_grad(), rg.active():
        rg.set_all(torch.tensor(everyone, dtype=torch.float64))
        rg.gates[key] = torch.tensor(value, dtype=torch.float64)
        total = sum(float(replayer.forward(b)[0].sum()) for b in batches)
    return -total / sum(b.n_scored for b in batches)


@pytest.fixture(scope="module")
def setup64(tiny_llama_3layers):
    """In float64 (weights; rotary tables stay float32) a central difference is exact enough to check a gradient."""
    gated, pad = gated_model(tiny_llama_3layers)
    gated.model.double()
    return gated, make_batches(val_set(), pad, 2)


def _derivative(gated, batches, key, at: float, eps: float = 1e-3) -> float:
    hi = _S_with_gate(gated, batches, key, at + eps, at)
    return (hi - _S_with_gate(gated, batches, key, at - eps, at)) / (2 * eps)


def test_first_order_is_the_gate_derivative(setup64, tmp_path):
    gated, batches = setup64
    table = run_study(study_for(gated, batches, "ab-first-order"), gated, batches, tmp_path)
    for key in [("V", 0), ("D", 2), ("Q", 1)]:
        cols = table.columns[f"{key[0]}.{key[1]}"]
        assert cols["dS_dg_at_all"] == pytest.approx(_derivative(gated, batches, key, 1.0), rel=3e-3, abs=1e-6)
        assert cols["dS_dg_at_null"] == pytest.approx(_derivative(gated, batches, key, 0.0), rel=3e-3, abs=1e-6)
        assert table.score(*key) == pytest.approx(cols["dS_dg_at_all"] + cols["dS_dg_at_null"])


def test_sensitivity_is_mean_absolute_batch_gradient(setup64, tmp_path):
    gated, batches = setup64
    table = run_study(study_for(gated, batches, "sensitivity"), gated, batches, tmp_path)
    assert all(v >= 0 for v in table.values.values())
    key = ("O", 1)
    # each batch's mean loss is −S of that batch alone
    per_batch = [abs(_derivative(gated, [b], key, 1.0)) for b in batches]
    assert table.score(*key) == pytest.approx(sum(per_batch) / len(per_batch), rel=3e-3)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    gated, pad = gated_model(make_tiny(tmp_path_factory.mktemp("one") / "m", "llama", layers=1), scale=0.5)
    return gated, make_batches(val_set((9, 14, 6)), pad, 2)


def test_shapley_exact_is_efficient_and_sampling_converges(one_layer, tmp_path):
    gated, batches = one_layer
    players = gated.keys  # 7 modules → 128 coalitions
    phi = shapley.exact_values(gated, batches, players)
    gated.set_all(True)
    s_all = performance(gated, batches)
    gated.set_all(False)
    s_null = performance(gated, batches)
    assert sum(phi.values()) == pytest.approx(s_all - s_null, abs=1e-5)  # efficiency
    table = run_study(
        study_for(gated, batches, "shapley", options={"budget": 120, "seed": 3}), gated, batches, tmp_path
    )
    # every sampled permutation is efficient too, so the estimate's sum is exact
    assert sum(table.values.values()) == pytest.approx(s_all - s_null, abs=1e-5)
    spread = max(abs(v) for v in phi.values())
    for key, value in phi.items():
        assert abs(table.values[key] - value) <= max(4 * table.columns[key]["std_error"], 0.05 * spread)
    worst = max(abs(table.values[k] - v) for k, v in phi.items())
    assert worst < 0.25 * spread


def test_shapley_steps_equal_whole_passes(setup, tmp_path):
    """The incremental (cached) walk through a permutation gives the same v(S) as whole passes."""
    gated, batches, _ = setup
    progress = Journal(tmp_path, "s", {})
    shapley.run(gated, batches, progress, [0], seed=7, memory_limit=BIG)
    curve = progress.done["0-3:p0"]["nll"]
    n = sum(b.n_scored for b in batches)
    order = shapley.permutation(gated.keys, 7, 0)
    for step in (0, 5, 13, 21):
        gated.set_all(False)
        for key in order[:step]:
            gated.set(key, True)
        assert -curve[step] / n == pytest.approx(performance(gated, batches), abs=1e-5)
    gated.set_all(True)


def test_shapley_budget_below_one_is_refused(setup):
    gated, batches, _ = setup
    with pytest.raises(UserError, match="at least 1 permutation"):
        study_for(gated, batches, "shapley", options={"budget": 0, "seed": 0})
    with pytest.raises(UserError, match="unknown scoring method"):
        study_for(gated, batches, "magic")


def test_every_method_feeds_select_and_round_trips(setup, tmp_path):
    from fanlora.stages.selection import select

    gated, batches, _ = setup
    for method, kw in [
        ("ab-exact", {}),
        ("sensitivity", {}),
        ("ab-first-order", {}),
        ("shapley", {"options": {"budget": 2, "seed": 0}}),
    ]:
        table = run_study(study_for(gated, batches, method, **kw), gated, batches, tmp_path / method)
        table.backbone = {"name": "tiny", "weights_digest": "x"}
        table.write(tmp_path / f"{method}.json", tmp_path / f"{method}.csv")
        back = ScoreTable.read(tmp_path / f"{method}.json")
        assert back.values == table.values and back.method == method
        assert select(back, 2).n_modules >= 1


def test_gradient_units_are_batches(setup):
    gated, batches, _ = setup
    s = study_for(gated, batches, "ab-first-order")
    assert s.units(0, 2) == [0, 2] and s.units(1, 2) == [1] and s.cost() == 2 * len(batches)


def test_compare_spearman_kendall_overlap(setup, tmp_path):
    from fanlora.scoring.compare import compare

    gated, batches, _ = setup
    a = run_study(study_for(gated, batches), gated, batches, tmp_path / "a")
    b = run_study(study_for(gated, batches), gated, batches, tmp_path / "b")
    b.values = {k: -v for k, v in a.values.items()}
    result = compare([a, a, b], ["a", "a2", "b"], k_max=2)
    assert result.spearman[0][1] == pytest.approx(1.0) and result.spearman[0][2] == pytest.approx(-1.0)
    assert result.kendall[0][2] == pytest.approx(-1.0) and result.overlap[0][1] == 1.0
    assert "Spearman" in result.markdown()
    other = ScoreTable(**{**a.__dict__, "backbone": {"weights_digest": "other"}})
    with pytest.raises(UserError, match="another backbone"):
        compare([a, other], ["a", "other"])
