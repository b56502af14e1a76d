"""A `fanlora finetune` killed at any moment resumes to the adapter an uninterrupted run makes.

Each kill is real: a subprocess runs the CLI with one of Trainer's (or our) save steps patched to SIGKILL the
process half-way — after the checkpoint's model weights, before its optimizer and trainer state; or after the
final adapter's files, before their rename — and a second, unpatched run resumes the same run directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fanlora.cli import main

KILLER = """
import os, signal, sys
from transformers import Trainer
import fanlora.atomic as atomic
point, count = sys.argv[1], {"save": 0, "step": 0}
real_save, real_publish, real_step = Trainer._save_optimizer_and_scheduler, atomic.publish_tree, Trainer.training_step

def step(self, *args, **kwargs):  # between two optimizer steps, after checkpoint-2 and step 3
    count["step"] += 1
    if point == "between-steps" and count["step"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, *args, **kwargs)

def save(self, output_dir):  # the checkpoint's model files are on disk, its optimizer and state are not
    count["save"] += 1
    if point == "mid-checkpoint" and count["save"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(self, output_dir)

def publish(tmp):  # the final adapter is written to its temporary folder, not yet renamed into place
    if point == "mid-final-save":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_publish(tmp)

Trainer._save_optimizer_and_scheduler, atomic.publish_tree, Trainer.training_step = save, publish, step
from fanlora.cli import main
sys.exit(main(sys.argv[2:]))
"""


def argv(tiny_llama: Path, setting: Path, run: Path) -> list[str]:
    return [
        "finetune", "--task", "copa", "--backbone", str(tiny_llama), "--setting", str(setting),
        "--run-dir", str(run), "--set", "finetune.max_train_examples=16", "--set", "finetune.max_dev_examples=4",
        "--set", "finetune.train.max_steps=6", "--set", "finetune.train.batch_size=4",
        "--set", "finetune.train.eval_steps=2", "--set", "evaluate.limit=2", "--set", "finetune.lora.dropout=0.0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    from helpers import setting_for

    from fanlora.backbone import load_backbone

    root = tmp_path_factory.mktemp("crash")
    setting = root / "setting.json"
    setting_for(load_backbone(str(tiny_llama))).write(setting)
    assert main(argv(tiny_llama, setting, root / "whole")) == 0
    return setting, load_file(str(root / "whole" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.e2e
@pytest.mark.parametrize("point", ["between-steps", "mid-checkpoint", "mid-final-save"])
def test_a_run_killed_mid_save_resumes_to_the_same_adapter(point, reference, tiny_llama, tmp_path):
    setting, whole = reference
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", KILLER, point, *argv(tiny_llama, setting, run)], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "adapter").exists()
    if point == "mid-checkpoint":  # checkpoint-4 is half on disk: what HF would pick and fail on
        assert (run / "checkpoints" / "checkpoint-4").is_dir()
        assert not (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()
    elif point == "mid-final-save":
        assert list(run.glob(".adapter.*"))
    else:
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert main(argv(tiny_llama, setting, run)) == 0
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert (resumed[key] - whole[key]).abs().max() < 1e-5, key
    assert not list(run.glob(".adapter.*"))
