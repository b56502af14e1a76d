"""The CLI as a user runs it: the whole pipeline on a tiny model, resume, and every bad input of the issue."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import copy_run, fail
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fanlora.backbone import load_backbone
from fanlora.cli import main


def search_on(data: Path, recipe: Path, tmp_path: Path) -> list[str]:
    """argv of a stage-a run on the given data file (a new run directory under tmp_path)."""
    return [
        "search",
        "--config",
        str(recipe),
        "--run-dir",
        str(tmp_path / "r"),
        "--set",
        f"search.data.sources=[{data}]",
    ]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, searched_run):
    recipe, searched = searched_run  # stages a and b, shared with test_score_cli
    run = copy_run(searched, tmp_path_factory.mktemp("cli") / "run")
    assert main(["select", "--run-dir", str(run), "--k-max", "2"]) == 0
    assert (
        main(
            [
                "finetune",
                "--setting",
                str(run / "setting.json"),
                "--config",
                str(recipe),
                "--run-dir",
                str(run / "copa"),
            ]
        )
        == 0
    )
    return recipe, run


@pytest.mark.e2e
def test_pipeline_writes_every_artifact(pipeline_run, tiny_llama):
    _, run = pipeline_run
    scores = json.loads((run / "scores.json").read_text())
    assert len(scores["scores"]) == 14 and scores["method"] == "ab-exact"
    assert (run / "scores.csv").read_text().count("\n") == 15
    assert not list(run.glob("scores.partial.*"))
    setting = json.loads((run / "setting.json").read_text())
    assert 1 <= setting["n_modules"] <= 4 and setting["backbone"]["model_type"] == "llama"
    for png in ("scores_heatmap", "setting_heatmap", "kinds_distribution"):
        assert (run / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((run / "copa" / "metrics.json").read_text())
    assert metrics["n"] == 8 and 0 <= metrics["acc"] <= 1
    # plain PEFT loads the task adapter, on exactly the setting's modules
    model = PeftModel.from_pretrained(load_backbone(str(tiny_llama)).model, str(run / "copa" / "adapter"))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == sorted(setting["modules"])


@pytest.mark.e2e
def test_evaluate_base_and_adapter(pipeline_run, tmp_path, tiny_llama, capsys):
    _, run = pipeline_run
    assert (
        main(
            [
                "evaluate",
                "--task",
                "boolq",
                "--base",
                "--backbone",
                str(tiny_llama),
                "--limit",
                "4",
                "--split",
                "dev",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["n"] == 4 and m["split"] == "dev" and m["adapter"] is None
    assert len((tmp_path / "b" / "predictions.jsonl").read_text().splitlines()) == 4
    assert (
        main(
            [
                "evaluate",
                "--task",
                "copa",
                "--adapter",  # no --backbone: the adapter's setting.json names it
                str(run / "copa" / "adapter"),
                "--limit",
                "4",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["adapter"].endswith("adapter")


@pytest.mark.e2e
def test_finished_stage_is_skipped_and_search_resumes_from_checkpoint(pipeline_run, capsys):
    _, run = pipeline_run
    assert main(["search", "--run-dir", str(run)]) == 0
    assert "done before" in capsys.readouterr().out
    resumed = run.parent / "resumed"
    shutil.copytree(run / "search", resumed / "search")
    shutil.copy(run / "run.json", resumed / "run.json")
    shutil.rmtree(resumed / "search" / "adapter")
    shutil.rmtree(resumed / "search" / "checkpoints" / "checkpoint-4")
    assert main(["search", "--run-dir", str(resumed)]) == 0
    metrics = json.loads((resumed / "search" / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["steps"] == 4


def test_bad_jsonl_line_is_named(tmp_path, recipe_file, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "only"}\n')
    msg = fail(
        capsys,
        search_on(bad, recipe_file, tmp_path),
    )
    assert f"{bad}:2" in msg and "output" in msg
    assert not (tmp_path / "r").exists()  # nothing left behind
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    assert f"{bad}:2: not valid JSON" in fail(
        capsys,
        search_on(bad, recipe_file, tmp_path),
    )


def test_empty_dataset(tmp_path, recipe_file, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "is empty" in fail(
        capsys,
        search_on(empty, recipe_file, tmp_path),
    )


@pytest.mark.e2e
def test_k_max_below_one_writes_nothing(pipeline_run, tmp_path, capsys):
    _, run = pipeline_run
    out = tmp_path / "s.json"
    assert "--k-max must be >= 1" in fail(
        capsys, ["select", "--scores", str(run / "scores.json"), "--k-max", "0", "--out", str(out)]
    )
    assert not out.exists()


@pytest.mark.e2e
def test_setting_for_another_backbone(pipeline_run, tmp_path, tiny_llama_other, tiny_llama_3layers, capsys):
    recipe, run = pipeline_run
    for other, needle in ((tiny_llama_other, "weights_digest"), (tiny_llama_3layers, "for 2 layers")):
        msg = fail(
            capsys,
            [
                "finetune",
                "--setting",
                str(run / "setting.json"),
                "--config",
                str(recipe),
                "--backbone",
                str(other),
                "--run-dir",
                str(tmp_path / other.name),
            ],
        )
        assert needle in msg
        assert not (tmp_path / other.name / "adapter").exists()


def test_unknown_module_kind(recipe_file, tmp_path, capsys):
    msg = fail(
        capsys,
        [
            "search",
            "--config",
            str(recipe_file),
            "--run-dir",
            str(tmp_path / "r"),
            "--module-map",
            "Q=self_attn.q_proj,Z=mlp.up_proj",
        ],
    )
    assert "unknown module kind 'Z'" in msg


@pytest.mark.e2e
def test_run_dir_with_a_different_run(pipeline_run, capsys):
    recipe, run = pipeline_run
    msg = fail(capsys, ["search", "--config", str(recipe), "--run-dir", str(run), "--set", "search.train.max_steps=5"])
    assert "holds a different run" in msg and "--overwrite" in msg and "--resume" in msg


def test_missing_model_path_and_gguf(tmp_path, recipe_file, capsys):
    assert "does not exist" in fail(
        capsys,
        ["evaluate", "--task", "copa", "--base", "--backbone", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
    )
    assert "GGUF file" in fail(
        capsys,
        ["evaluate", "--task", "copa", "--base", "--backbone", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "o")],
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_console_script_exit_status_without_traceback(tmp_path):
    """The installed entry point, as a user runs it, on a missing GGUF file."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fanlora",
            "evaluate",
            "--task",
            "copa",
            "--base",
            "--backbone",
            str(tmp_path / "x.gguf"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error: GGUF file")
    assert Path(tmp_path / "x.gguf").exists() is False


@pytest.mark.e2e
def test_overwrite_starts_a_new_run_with_the_new_config(recipe_file, tmp_path):
    run = tmp_path / "run"
    assert main(["search", "--config", str(recipe_file), "--run-dir", str(run)]) == 0
    assert (
        main(
            [
                "search",
                "--config",
                str(recipe_file),
                "--run-dir",
                str(run),
                "--overwrite",
                "--set",
                "search.train.max_steps=2",
            ]
        )
        == 0
    )
    assert json.loads((run / "run.json").read_text())["config"]["search"]["train"]["max_steps"] == 2
    assert json.loads((run / "search" / "metrics.json").read_text())["steps"] == 2


@pytest.mark.e2e
def test_demo_prints_a_machine_readable_result(recipe_file, tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--config", str(recipe_file), "--run-dir", str(run)]) == 0
    *_, report_line, last = capsys.readouterr().out.strip().splitlines()
    fields = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert last.startswith("RESULT ") and fields["run_dir"] == str(run)
    assert report_line == f"report: {run / 'report.html'}" and "data-score=" in (run / "report.html").read_text()
    assert set(fields) == {"run_dir", "minutes", "modules_kept", "copa_acc_base", "copa_acc_fanlora"}
    summary = json.loads((run / "summary.json").read_text())
    assert int(fields["modules_kept"]) == summary["modules_kept"] >= 1
    assert float(fields["copa_acc_fanlora"]) == pytest.approx(summary["copa_acc_fanlora"], abs=1e-4)
    env = summary["environment"]  # what the figures are reproducible under: torch build, threads, CPU, precision
    assert env["threads"] >= 1 and env["torch"] and env["cpu"] and isinstance(env["native_bf16"], bool)
