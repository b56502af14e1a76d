"""Stage a under torchrun with two CPU processes (gloo): it trains, writes one adapter, and that loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import tiny_recipe
from peft import PeftModel

from fanlora.backbone import load_backbone

pytestmark = pytest.mark.e2e  # both run stage a under torchrun


def test_search_under_torchrun_two_processes(tmp_path, tiny_llama):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_llama)))
    run = tmp_path / "run"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",  # a free rendezvous port on localhost
            "--nproc_per_node",
            "2",
            "-m",
            "fanlora",
            "search",
            "--config",
            str(recipe),
            "--run-dir",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stage a: adapter at") == 1  # only rank 0 reports
    assert "is not a fanlora run" not in proc.stderr  # ranks do not race on the run directory
    state = json.loads((run / "search" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert json.loads((run / "search" / "metrics.json").read_text())["steps"] == 4
    model = PeftModel.from_pretrained(load_backbone(str(tiny_llama)).model, str(run / "search" / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_score_under_torchrun_equals_one_process(tmp_path, tiny_llama):
    """The (kind, layer) work splits over 2 gloo ranks; rank 0 gathers and writes the same scores."""
    from fanlora.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_llama)))
    run = tmp_path / "run"
    assert main(["search", "--config", str(recipe), "--run-dir", str(run)]) == 0
    assert main(["score", "--run-dir", str(run)]) == 0
    single = json.loads((run / "scores.json").read_text())
    (run / "scores.json").unlink()
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fanlora", "score", "--run-dir", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("stage b: scores at") == 1
    double = json.loads((run / "scores.json").read_text())
    assert double["processes"] == 2 and not list(run.glob("scores.partial.*"))
    a = {(r["kind"], r["layer"]): r["score"] for r in single["scores"]}
    b = {(r["kind"], r["layer"]): r["score"] for r in double["scores"]}
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-6
