"""`fanlora evaluate` over several tasks and `fanlora finetune` on every task, as a user runs them."""

from __future__ import annotations

import json

import pytest
from helpers import fail

from fanlora.backbone import load_backbone
from fanlora.cli import main
from fanlora.tasks import known_tasks

ALL_TASKS = known_tasks()  # every registered task: a new task file is tested here without editing this list


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_llama):
    """A setting for the tiny model: V and O of every layer."""
    from helpers import setting_for

    path = tmp_path_factory.mktemp("setting") / "setting.json"
    setting_for(load_backbone(str(tiny_llama))).write(path)
    return path


def test_evaluate_several_tasks_in_one_run(tmp_path, tiny_llama, capsys):
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        "--task",
        "sql",
        "--task",
        "squad",
        "--task",
        "boolq",
        "--base",
        "--backbone",
        str(tiny_llama),
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--mode",
        "generate",
        "--decoding",
        "beam",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    for task, key in (("sql", "execution_accuracy"), ("squad", "f1_em"), ("boolq", "acc")):
        m = json.loads((out / task / "metrics.json").read_text())
        assert m["task"] == task and m["n"] == 2 and 0 <= m[key] <= (100 if task == "squad" else 1)
        assert m["mode"] == "generate" and m["decoding"] == "beam"
        assert len((out / task / "predictions.jsonl").read_text().splitlines()) == 2
    assert capsys.readouterr().out.count("evaluate: ") == 3


def test_evaluate_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_llama, capsys):
    out = tmp_path / "eval"
    base = ["evaluate", "--base", "--backbone", str(tiny_llama), "--out", str(out)]
    err = fail(capsys, [*base, "--task", "copa", "--task", "squad2"])
    assert "unknown task 'squad2'" in err and "copa, gsm8k, mmlu, mtbench, sql, squad" in err
    err = fail(capsys, [*base, "--task", "squad", "--mode", "loglik"])
    assert "generation only" in err
    err = fail(capsys, [*base, "--task", "copa", "--data", "test"])
    assert "SPLIT=SOURCE" in err
    err = fail(capsys, [*base, "--task", "copa", "--data", f"test={tmp_path / 'missing.jsonl'}"])
    assert "does not exist" in err
    err = fail(capsys, [*base, "--task", "sql", "--decoding", "beam", "--num-beams", "1"])
    assert "num-beams" in err
    assert not out.exists()


@pytest.mark.e2e
@pytest.mark.parametrize("task", ALL_TASKS)
def test_finetune_works_for_every_task(task, setting, tmp_path, tiny_llama):
    run = tmp_path / task
    argv = [
        "finetune",
        "--task",
        task,
        "--setting",
        str(setting),
        "--backbone",
        str(tiny_llama),
        "--run-dir",
        str(run),
        "--set",
        "finetune.max_train_examples=8",
        "--set",
        "finetune.max_dev_examples=4",
        "--set",
        "finetune.max_length=96",
        "--set",
        "finetune.train.max_steps=2",
        "--set",
        "finetune.train.batch_size=4",
        "--set",
        "finetune.train.eval_steps=1",
        "--set",
        "evaluate.limit=2",
        "--max-new-tokens",
        "3",
    ]
    assert main(argv) == 0
    trained = json.loads((run / "train_metrics.json").read_text())
    assert trained["task"] == task and trained["steps"] == 2 and trained["trainable_parameters"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "adapter" / "setting.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == task and metrics["n"] == 2 and metrics["adapter"] == str(run / "adapter")


@pytest.mark.e2e
def test_finetune_refuses_a_run_dir_made_from_another_setting_and_publishes_portable_files(
    setting, tmp_path, tiny_llama, capsys
):
    import os
    import stat

    from helpers import setting_for

    from fanlora.backbone import load_backbone

    other = tmp_path / "other-setting.json"
    setting_for(load_backbone(str(tiny_llama)), kinds=("Q", "D")).write(other)
    run = tmp_path / "copa"
    argv = [
        "finetune", "--task", "copa", "--backbone", str(tiny_llama), "--run-dir", str(run),
        "--set", "finetune.max_train_examples=8", "--set", "finetune.max_dev_examples=4",
        "--set", "finetune.train.max_steps=1", "--set", "finetune.train.batch_size=4",
        "--set", "evaluate.limit=2",
    ]  # fmt: skip
    old = os.umask(0o022)
    try:
        assert main([*argv, "--setting", str(setting)]) == 0
    finally:
        os.umask(old)
    err = fail(capsys, [*argv, "--setting", str(other)])
    assert "another setting" in err and "--overwrite" in err
    assert main([*argv, "--setting", str(setting)]) == 0  # the same setting continues the run
    adapter = run / "adapter"
    assert stat.S_IMODE(adapter.stat().st_mode) == 0o755
    for f in [*adapter.iterdir(), run / "metrics.json", run / "run.json"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == tiny_llama.name and "/" not in base
