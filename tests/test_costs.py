"""The placement cost table and Pareto front (fanlora.experiments.costs) on a hand-made published grid."""

import json

import pytest

from fanlora.experiments import costs


def _grid(tmp_path, stage_a=True):
    rows = [
        {"task": "sql", "variant": v, "metric": "execution_accuracy", "values": vals, "gold_nll_mean": loss}
        for v, vals, loss in [("ab", [0.5, 0.6], 0.11), ("grad", [0.52, 0.54], 0.12), ("o", [0.4, 0.5], 0.14),
                              ("drop", [0.3, 0.3], 0.15)]
    ]  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "settings").mkdir()
    (tmp_path / "scores").mkdir()
    for v, scorer, setting in [("ab", "ab-exact", "top"), ("grad", "grad-norm", "top"), ("o", "ab-exact", "fixed:O"),
                               ("drop", "lora-drop", "top")]:  # fmt: skip
        (tmp_path / "settings" / f"{v}.rank.json").write_text(json.dumps({"scorer": scorer, "setting": setting}))
    (tmp_path / "scores" / "scores.json").write_text(json.dumps({"method": "ab-exact", "minutes": 15.0}))
    (tmp_path / "scores" / "scores-grad-norm.json").write_text(
        json.dumps({"method": "grad-norm", "cost": {"cpu_seconds": 90.0}})
    )
    (tmp_path / "scores" / "scores-lora-drop.json").write_text(
        json.dumps({"method": "lora-drop", "cost": {"cpu_seconds": 30.0}})
    )
    if stage_a:
        (tmp_path / "scores" / "stage_a.json").write_text(json.dumps({"cpu_seconds": 300.0}))
    return tmp_path


def test_costs_add_stage_a_only_for_scorers_that_read_one(tmp_path):
    rows = {r["variant"]: r for r in costs.variant_costs(_grid(tmp_path))}
    assert rows["ab"]["total_min"] == pytest.approx((300 + 15 * 60) / 60)  # wall minutes where no CPU time
    assert rows["ab"]["scoring_is_cpu"] is False
    assert rows["grad"]["total_min"] == pytest.approx(1.5)  # the bare backbone: no stage a
    assert rows["drop"]["total_min"] == pytest.approx(5.5)  # LoRA-drop reads stage a's adapter
    assert rows["o"]["total_min"] == 0.0  # a fixed setting costs nothing
    assert rows["ab"]["quality"] == pytest.approx(0.55)


def test_pareto_front_is_what_nothing_beats_on_both(tmp_path):
    rows = costs.variant_costs(_grid(tmp_path))
    assert [r["variant"] for r in costs.pareto(rows, "quality", True)] == ["o", "grad", "ab"]
    assert [r["variant"] for r in costs.pareto(rows, "gold_nll", False)] == ["o", "grad", "ab"]
    md = costs.markdown(rows)
    assert "| `drop` | lora-drop | 5.0 | 0.5 | 5.5 | 2 | 0.300 | 0.1500 |" in md
    assert "15.0 (wall)" in md


def test_main_writes_table_and_figure_or_refuses_in_one_line(tmp_path, capsys):
    grid = _grid(tmp_path)
    assert costs.main([str(grid)]) == 0
    assert (grid / "cost.md").is_file() and (grid / "sql_pareto.png").stat().st_size > 1000
    (grid / "scores" / "stage_a.json").unlink()
    assert costs.main([str(grid)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage_a.json is missing" in err
