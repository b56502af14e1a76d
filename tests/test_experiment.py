"""Baselines through the one training path, the budget helper, and the resumable experiment grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import fail, grid_config

from fanlora.cli import main


@pytest.mark.e2e
def test_grid_runs_resumes_cell_by_cell_and_aggregates(tmp_path, recipe_file, capsys):
    exp = grid_config(tmp_path, recipe_file)
    assert main(["experiment", str(exp), "--shard", "0/2"]) == 0  # half the cells, as if killed midway
    cells = sorted((tmp_path / "grid" / "cells").glob("*/cell.json"))
    assert len(cells) == 2
    assert main(["experiment", str(exp), "--resume", "--cells", "copa__lora__*"]) == 0  # a filter
    cells = sorted((tmp_path / "grid" / "cells").glob("*/cell.json"))
    assert len(cells) == 3 and "copa__lora__default__s1" in {p.parent.name for p in cells}
    stamps = {p: p.stat().st_mtime_ns for p in cells}
    capsys.readouterr()
    assert main(["experiment", str(exp), "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("(done before)") == 3 and "cells_done=4/4" in out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"fanlora", "lora"} and all(r["seeds"] == [0, 1] for r in rows.values())
    assert rows["fanlora"]["trainable_parameters"] < rows["lora"]["trainable_parameters"] * 12 / 4
    for r in rows.values():
        assert r["median"] == pytest.approx(sum(r["values"]) / 2)
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| default | fanlora |" in table and "| default | lora |" in table
    assert "Paired comparisons" in table and "- fanlora/default vs lora/default (value, 8 items × 2 seeds)" in table
    (comparison,) = results["comparisons"]
    assert comparison["verdict"] in ("win", "tie", "loss") and comparison["n_items"] == 8
    items = (tmp_path / "grid" / "cells" / "copa__lora__default__s0" / "items.jsonl").read_text().splitlines()
    assert len(items) == 8 and {"id", "value"} <= set(json.loads(items[0]))
    assert not list((tmp_path / "grid" / "cells").glob("*/checkpoints"))
    # a rerun without --resume, or with a changed config, is refused
    assert "pass --resume" in fail(capsys, ["experiment", str(exp)])
    assert "no cell id matches" in fail(capsys, ["experiment", str(exp), "--resume", "--cells", "sql__*"])
    changed = grid_config(tmp_path, recipe_file, seeds=[0, 1, 2])
    assert "another config" in fail(capsys, ["experiment", str(changed), "--resume"])


@pytest.mark.e2e
def test_a_config_that_only_adds_a_variant_resumes_the_grid_and_one_that_changes_a_variant_does_not(
    tmp_path, recipe_file, capsys
):
    exp = grid_config(tmp_path, recipe_file, methods=["lora"], seeds=[0], variants={"a": {"r1": 4}})
    assert main(["experiment", str(exp)]) == 0
    done = tmp_path / "grid" / "cells" / "copa__lora__a__s0" / "cell.json"
    stamp = done.stat().st_mtime_ns
    grown = grid_config(tmp_path, recipe_file, methods=["lora"], seeds=[0], variants={"a": {"r1": 4}, "b": {"r1": 2}})
    capsys.readouterr()
    assert main(["experiment", str(grown), "--resume", "--cells", "copa__lora__b__s0"]) == 0
    assert done.stat().st_mtime_ns == stamp and (done.parent.parent / "copa__lora__b__s0" / "cell.json").is_file()
    marker = json.loads((tmp_path / "grid" / "experiment.json").read_text())
    assert set(marker["experiment"]["variants"]) == {"a", "b"}
    changed = grid_config(tmp_path, recipe_file, methods=["lora"], seeds=[0], variants={"a": {"r1": 2}, "b": {"r1": 2}})
    assert "another config" in fail(capsys, ["experiment", str(changed), "--resume"])


@pytest.mark.e2e
def test_kmax_variants_share_a_budget_and_plot(tmp_path, recipe_file):
    exp = grid_config(
        tmp_path,
        recipe_file,
        methods=["fanlora"],
        seeds=[0],
        variants={"k1": {"k_max": 1, "r1": "budget"}, "k3": {"k_max": 3, "r1": "budget"}},
        budget={"k_max": 2, "r": 6},
    )
    assert main(["experiment", str(exp)]) == 0
    settings = tmp_path / "grid" / "settings"
    r1 = json.loads((settings / "k1.rank.json").read_text())["r"]
    r3 = json.loads((settings / "k3.rank.json").read_text())["r"]
    assert r1 > r3 >= 1
    cells = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "grid" / "cells").glob("*/cell.json")}
    p1, p3 = (cells[f"copa__fanlora__{k}__s0"]["trainable_parameters"] for k in ("k1", "k3"))
    assert abs(p1 - p3) / max(p1, p3) < 0.35
    assert (tmp_path / "report" / "copa.png").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"methods": ["fanlora", "prefix"]}, "unknown method 'prefix'; methods are fanlora, lora"),
        ({"tasks": ["copa", "wsc"]}, "task 'wsc' cannot be in a grid"),
        ({"tasks": ["mtbench"]}, "mtbench needs a judge"),
        ({"variants": {"a": {"kmax": 1}}}, "variant a has unknown option 'kmax'"),
        ({"variants": {"a": {"scorer": "magic"}}}, "unknown scoring method 'magic'"),
        ({"method_options": {"lora": {"rank": 8}}}, "unknown option 'rank' for method lora"),
        ({"set": ["finetune.trian.seed=1"]}, "unknown config key finetune.trian"),
        ({"grid": {}}, "unknown key 'grid'"),
        ({"variants": {"a": {"setting": "best"}}}, "unknown setting rule 'best'"),
        ({"reference": "nope"}, "reference 'nope' is not a variant"),
    ],
)
def test_bad_experiment_configs_are_refused_before_anything_runs(tmp_path, recipe_file, capsys, extra, message):
    exp = grid_config(tmp_path, recipe_file, **extra)
    assert message in fail(capsys, ["experiment", str(exp)])
    assert not (tmp_path / "grid").exists() and not (tmp_path / "run").exists()


def test_source_row_ranges_split_one_file():
    from fanlora.data.records import read_source
    from fanlora.errors import UserError

    whole = read_source("bundled:boolq/val")
    head, tail = read_source("bundled:boolq/val[0:1571]"), read_source("bundled:boolq/val[1571:1635]")
    assert head == whole[:1571] and tail == whole[1571:1635]
    with pytest.raises(UserError, match="selects nothing"):
        read_source("bundled:boolq/val[5000:]")


@pytest.mark.e2e
def test_setting_rules_and_paired_gold_losses(tmp_path, recipe_file):
    from fanlora.scoring import ScoreTable
    from fanlora.setting import Setting

    variants = {
        "ab": {},
        "inverse": {"setting": "inverse"},
        "random1": {"setting": "random:1", "r1": "budget"},
        "vo": {"setting": "fixed:V,O"},
    }
    overrides = ["finetune.train.max_steps=2", "finetune.train.eval_steps=1", "finetune.max_dev_examples=4"]
    overrides += ["evaluate.gold_loss=true", "evaluate.loss_limit=6"]
    extra = {"methods": ["fanlora"], "seeds": [0], "variants": variants, "budget": {"k_max": 2, "r": 4}}
    exp = grid_config(tmp_path, recipe_file, set=overrides, **extra)
    assert main(["experiment", str(exp)]) == 0
    table = ScoreTable.read(tmp_path / "run" / "scores.json")
    settings = {name: Setting.read(tmp_path / "grid" / "settings" / f"{name}.json") for name in variants}
    for layer in range(table.num_layers):
        ranked = sorted(table.kinds, key=lambda k: table.score(k, layer))
        assert sorted(settings["inverse"].kept[layer]) == sorted(ranked[:2])
        assert settings["vo"].kept[layer] == ["V", "O"] and len(settings["random1"].kept[layer]) == 2
    assert settings["random1"].kept != settings["ab"].kept
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    losses = {c["b"]: c for c in results["comparisons"] if c["metric"] == "gold_nll"}
    assert set(losses) == {"fanlora/inverse", "fanlora/random1", "fanlora/vo"}
    assert all(c["n_items"] == 6 and c["n_seeds"] == 1 and not c["higher_is_better"] for c in losses.values())
    rows = {r["variant"]: r for r in results["rows"]}
    assert all(r["gold_nll_mean"] > 0 for r in rows.values())
    assert (tmp_path / "report" / "copa_gold_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_comparisons_use_the_seeds_both_sides_have(tmp_path):
    from types import SimpleNamespace

    from fanlora.experiments.report import paired

    exp = SimpleNamespace(out=str(tmp_path), reference="ab", variants={"ab": None, "rnd": None})
    records = []
    for variant, seeds, shift in (("ab", [0, 1], 0.0), ("rnd", [0], 0.1)):
        for seed in seeds:
            cid = f"sql__fanlora__{variant}__s{seed}"
            (tmp_path / "cells" / cid).mkdir(parents=True)
            lines = [json.dumps({"id": f"q{i}", "gold_nll": 0.5 + shift + 0.01 * i}) for i in range(5)]
            (tmp_path / "cells" / cid / "items.jsonl").write_text("\n".join(lines))
            records.append({"id": cid, "task": "sql", "variant": variant, "method": "fanlora", "seed": seed,
                            "trainable_parameters": 1})  # fmt: skip
    (c,) = paired(exp, records)
    assert c["n_seeds"] == 1 and c["n_items"] == 5 and c["mean_diff"] == pytest.approx(-0.1)


def test_seed_effects_say_how_far_a_groups_seeds_differ_item_by_item(tmp_path):
    from types import SimpleNamespace

    from fanlora.experiments.report import section_lines, seed_effects

    exp = SimpleNamespace(out=str(tmp_path))
    records = []
    for seed, flips in ((0, []), (1, [3])):  # seed 1 gets item 3 wrong, and its losses move by 0.02
        cid = f"boolq__lora__default__s{seed}"
        (tmp_path / "cells" / cid).mkdir(parents=True)
        rows = [{"id": f"q{i}", "value": float(i not in flips), "gold_nll": 0.5 + 0.02 * seed} for i in range(5)]
        (tmp_path / "cells" / cid / "items.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        records.append({"id": cid, "task": "boolq", "variant": "default", "method": "lora", "seed": seed})
    effects = {e["metric"]: e for e in seed_effects(exp, records)}
    assert effects["value"]["items_that_change_across_seeds"] == pytest.approx(0.2)
    assert effects["value"]["seed_means_min"] == pytest.approx(0.8) and effects["value"]["seed_means_max"] == 1.0
    assert effects["gold_nll"]["item_sd_across_seeds"] == pytest.approx(0.02 / 2**0.5)
    assert "lora/default (value, 2 seeds): seed means 0.8000 – 1.0000; 20.0 % of items change" in "\n".join(
        section_lines("seeds", "boolq", list(effects.values()))
    )
    assert seed_effects(exp, records[:1]) == []  # one seed: nothing to compare


def test_the_reference_meets_the_random_draws_as_a_pool(tmp_path):
    from types import SimpleNamespace

    from fanlora.experiments.report import markdown, pooled

    variants = {"ab": "top", "random1": "random:1", "random2": "random:2", "random3": "random:3", "vo": "fixed:V,O"}
    exp = SimpleNamespace(out=str(tmp_path), reference="ab", tasks=["sql"], name="t",
                          variants={k: SimpleNamespace(setting=v) for k, v in variants.items()})  # fmt: skip
    records = []
    for variant, shift in (("ab", 0.0), ("random1", 0.08), ("random2", 0.12), ("random3", 0.1), ("vo", -0.05)):
        cid = f"sql__fanlora__{variant}__s0"
        (tmp_path / "cells" / cid).mkdir(parents=True)
        lines = [json.dumps({"id": f"q{i}", "gold_nll": 0.5 + shift + 0.01 * (i % 7)}) for i in range(50)]
        (tmp_path / "cells" / cid / "items.jsonl").write_text("\n".join(lines))
        records.append({"id": cid, "task": "sql", "variant": variant, "method": "fanlora", "seed": 0})
    (c,) = pooled(exp, records)  # gold_nll only: these items have no per-item score
    assert c["members"] == ["random1", "random2", "random3"] and c["pool"] == "random (3 settings)"
    assert c["mean_diff"] == pytest.approx(-0.1) and c["verdict"] == "win" and c["p_rank"] == pytest.approx(0.25)
    summary = {"cells_done": 5, "cells": 5, "grid_minutes": 0, "rows": [], "pool_comparisons": [c]}
    text = markdown(SimpleNamespace(**vars(exp)), summary, notes="Design: five draws.\n")
    assert text.startswith("# t\n\nDesign: five draws.\n\n5 of 5 cells done")
    assert "fanlora/ab vs random (3 settings) (gold_nll, 50 items × 3 draws): -0.1000" in text
    assert "rank p = 0.25" in text
    assert pooled(exp, records[:2]) == []  # one draw is not a pool


GRIDS = Path(__file__).parents[1] / "fanlora" / "configs" / "experiments"


@pytest.mark.parametrize("name", sorted(p.stem for p in GRIDS.glob("*.yaml")))
def test_committed_experiment_configs_parse(name):
    from fanlora.experiments.config import cells, parse

    exp = parse(GRIDS / f"{name}.yaml")
    assert exp.name == name and len(cells(exp)) == len(exp.seeds) * sum(
        len(v.methods or exp.methods) * len(exp.tasks) for v in exp.variants.values()
    )


def test_cells_written_before_clusters_get_the_tasks_keys(tmp_path):
    """Committed grids' items.jsonl have no cluster: the report takes SQL's intents from the task itself, so
    their intervals resample question templates, not the 402 items one by one."""
    from types import SimpleNamespace

    from fanlora.experiments.report import item_clusters, paired
    from fanlora.tasks import get_task

    test = get_task("sql").examples("test")[:60]
    exp = SimpleNamespace(out=str(tmp_path), reference="ab", variants={"ab": None, "vo": None})
    records = []
    for variant, shift in (("ab", 0.0), ("vo", 0.05)):
        cid = f"sql__fanlora__{variant}__s0"
        (tmp_path / "cells" / cid).mkdir(parents=True)
        lines = [json.dumps({"id": e.id, "gold_nll": 0.5 + shift + 0.01 * (n % 5)}) for n, e in enumerate(test)]
        (tmp_path / "cells" / cid / "items.jsonl").write_text("\n".join(lines))
        records.append({"id": cid, "task": "sql", "variant": variant, "method": "fanlora", "seed": 0,
                        "trainable_parameters": 1})  # fmt: skip
    assert item_clusters(exp, records) == {e.id: e.cluster for e in test}
    (c,) = paired(exp, records)
    assert c["n_clusters"] == len({e.cluster for e in test}) < 60 and c["verdict"] == "win"


def test_every_pair_of_multi_seed_groups_gets_a_verdict(monkeypatch):
    """Besides the reference against each group, contenders (groups with more than one seed) are compared
    pairwise; one-seed anchors only against the reference."""
    from types import SimpleNamespace

    from fanlora.experiments import report

    effect = {"ab": 0.0, "vo": 0.3, "cost": 0.1, "random": 0.5}
    records = [
        {"task": "sql", "variant": v, "method": "fanlora", "seed": s, "trainable_parameters": 10, "v": v}
        for v, seeds in (("ab", 3), ("vo", 3), ("cost", 3), ("random", 1))
        for s in range(seeds)
    ]

    def outcomes(exp, rs, key):
        return {r["seed"]: {f"i{i}": effect[r["v"]] + 0.01 * ((i * 7 + r["seed"]) % 5) for i in range(40)} for r in rs}

    monkeypatch.setattr(report, "item_outcomes", outcomes)
    monkeypatch.setattr(report, "item_clusters", lambda exp, rs: {f"i{i}": f"c{i % 10}" for i in range(40)})
    exp = SimpleNamespace(reference="ab", variants={"ab": {}, "vo": {}, "cost": {}, "random": {}})
    pairs = {(c["a"], c["b"]) for c in report.paired(exp, records) if c["metric"] == "value"}
    assert pairs == {
        ("fanlora/ab", "fanlora/vo"), ("fanlora/ab", "fanlora/cost"), ("fanlora/ab", "fanlora/random"),
        ("fanlora/cost", "fanlora/vo"),
    }  # fmt: skip


def test_results_table_rounds_summed_train_minutes():
    """A median of two seeds' minutes (a float sum) printed as 49.809999999999995 before."""
    from types import SimpleNamespace

    from fanlora.experiments.report import _table

    row = {"metric": "accuracy", "n_test": 4, "n_loss": 4, "variant": "ab", "method": "fanlora", "values": [0.5],
           "median": 0.5, "min": 0.5, "max": 0.5, "gold_nll_mean": None, "trainable_parameters": 10,
           "train_minutes_median": 49.809999999999995}  # fmt: skip
    line = _table(SimpleNamespace(variants={"ab": {}}), "copa", [row])[4]
    assert "| 49.81 |" in line and "49.8099" not in line


@pytest.mark.e2e
def test_budget_variants_from_another_scorer_are_sized_to_the_experiments_own_budget(tmp_path, recipe_file):
    """A variant scored another way was once sized to its own table's top setting, not to the shared budget."""
    from fanlora import methods
    from fanlora.backbone import from_config
    from fanlora.config import load_config
    from fanlora.scoring import ScoreTable
    from fanlora.setting import Setting
    from fanlora.stages.selection import select

    run = tmp_path / "run"
    assert main(["search", "--config", str(recipe_file), "--run-dir", str(run)]) == 0
    for method in ("ab-exact", "ab-first-order"):
        assert main(["score", "--run-dir", str(run), "--scorer", method]) == 0
    scores = json.loads((run / "scores-ab-first-order.json").read_text())
    for entry in scores["scores"]:  # the other scorer prefers the MLP's wider modules
        entry["score"] = 1.0 if entry["kind"] in ("U", "D") else 0.0
    (run / "scores-ab-first-order.json").write_text(json.dumps(scores))
    variants = {"ab": {"r1": "budget"}, "fo": {"scorer": "ab-first-order", "setting": "fixed:Q", "r1": "budget"}}
    overrides = ["finetune.train.max_steps=1", "finetune.train.eval_steps=1", "finetune.max_dev_examples=4"]
    extra = {"methods": ["fanlora"], "seeds": [0], "variants": variants, "budget": {"k_max": 2, "r": 4}}
    assert main(["experiment", str(grid_config(tmp_path, recipe_file, set=overrides, **extra)), "--cells", "*fo*"]) == 0
    bb = from_config(load_config(str(recipe_file)).backbone)
    wide = select(ScoreTable.read(run / "scores-ab-first-order.json"), 2).modules
    budget = methods.lora_params(bb, select(ScoreTable.read(run / "scores.json"), 2).modules, 4)
    assert methods.lora_params(bb, wide, 4) > budget  # what the variant was sized to before
    fixed_q = Setting.read(tmp_path / "grid" / "settings" / "fo.json").modules
    rank = json.loads((tmp_path / "grid" / "settings" / "fo.rank.json").read_text())["r"]
    assert rank == methods.lora_rank_for_budget(bb, fixed_q, budget)
    assert rank < methods.lora_rank_for_budget(bb, fixed_q, methods.lora_params(bb, wide, 4))
