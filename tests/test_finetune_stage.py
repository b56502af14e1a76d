"""Stage d is defined once (fanlora.stages.finetune): `fanlora finetune` loads the backbone once, fine-tunes any
registered method, evaluates in memory what a reload of its adapter would give, and refuses bad plans at once."""

from __future__ import annotations

import json

import pytest
from helpers import fail

from fanlora.backbone import load_backbone
from fanlora.cli import main

SMALL = [
    "--set", "finetune.max_train_examples=8", "--set", "finetune.max_dev_examples=4",
    "--set", "finetune.max_length=96", "--set", "finetune.train.max_steps=2",
    "--set", "finetune.train.batch_size=4", "--set", "finetune.train.eval_steps=1",
    "--set", "evaluate.limit=4", "--set", "evaluate.gold_loss=true", "--set", "evaluate.loss_limit=4",
]  # fmt: skip


@pytest.fixture
def loads(monkeypatch):
    """Every backbone load, counted (from_config and the evaluation loader both go through load_backbone)."""
    import fanlora.backbone as backbone

    count, real = [], backbone.load_backbone
    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **k: count.append(a) or real(*a, **k))
    return count


def _setting(tmp_path, tiny_llama):
    from helpers import setting_for

    path = tmp_path / "setting.json"
    setting_for(load_backbone(str(tiny_llama))).write(path)
    return path


@pytest.mark.e2e
def test_finetune_loads_the_backbone_once_and_a_rerun_evaluates_the_saved_adapter(tmp_path, tiny_llama, loads):
    setting, run = _setting(tmp_path, tiny_llama), tmp_path / "copa"
    argv = ["finetune", "--task", "copa", "--backbone", str(tiny_llama), "--setting", str(setting),
            "--run-dir", str(run), *SMALL]  # fmt: skip
    loads.clear()
    assert main(argv) == 0
    assert len(loads) == 1  # before stage d was one module, evaluation loaded the backbone a second time
    first = json.loads((run / "metrics.json").read_text())
    loads.clear()
    assert main([*argv, "--resume"]) == 0  # trained before: the adapter is loaded back and evaluated, not retrained
    assert len(loads) == 1
    again = json.loads((run / "metrics.json").read_text())
    assert again["acc"] == first["acc"] and again["gold_nll"] == pytest.approx(first["gold_nll"], abs=1e-5)


@pytest.mark.e2e
def test_finetune_trains_a_baseline_method_with_its_options(tmp_path, tiny_llama):
    run = tmp_path / "lora"
    argv = ["finetune", "--task", "copa", "--backbone", str(tiny_llama), "--method", "lora", "--option", "r=2",
            "--run-dir", str(run), *SMALL]  # fmt: skip
    assert main(argv) == 0
    trained = json.loads((run / "train_metrics.json").read_text())
    assert trained["method"] == "lora" and trained["options"] == {"r": 2}
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and not (run / "adapter" / "setting.json").exists()  # no setting: not FanLoRA's
    assert json.loads((run / "run.json").read_text())["inputs"] == {"method": "lora"}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "fanlora"], "pass --setting"),
        (["--method", "lora", "--option", "rank=2"], "unknown option 'rank' for method lora"),
        (["--method", "lora", "--option", "r"], "expected KEY=VALUE"),
        (["--method", "ssp"], "needs a parameter budget"),
    ],
)
def test_finetune_refuses_a_bad_plan_in_one_line_and_writes_nothing(extra, needle, tmp_path, tiny_llama, capsys):
    run = tmp_path / "run"
    err = fail(capsys, ["finetune", "--task", "copa", "--backbone", str(tiny_llama), "--run-dir", str(run), *SMALL,
                        *extra])  # fmt: skip
    assert needle in err and not run.exists()


def test_a_searched_method_with_a_setting_is_sized_to_fanloras_budget(tmp_path, tiny_llama):
    from fanlora import methods
    from fanlora.config import load_config
    from fanlora.setting import Setting
    from fanlora.stages.finetune import Plan, options_for

    setting = Setting.read(_setting(tmp_path, tiny_llama))
    backbone = load_backbone(str(tiny_llama))
    cfg = load_config(None, ["finetune.lora.r=3"])
    options = options_for(cfg, Plan("ssp", {}, setting), backbone)
    assert options["budget"] == methods.lora_params(backbone, setting.modules, 3)
    assert options_for(cfg, Plan("fanlora", {}, setting), backbone) == {"r": 3, "alpha": cfg.finetune.lora.alpha}
    assert options_for(cfg, Plan("fanlora", {"r": 5, "alpha": 7}, setting), backbone) == {"r": 5, "alpha": 7}
