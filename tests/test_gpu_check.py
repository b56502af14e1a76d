"""`scripts/gpu-check.sh`'s CPU rehearsal: the script a lent GPU runs, run here end to end on a tiny shape, so
that it works the day a GPU is lent (it has no second chance there: 15 minutes of device time in all)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def rehearsal(tmp_path: Path, tiny_llama: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_SHAPE": str(tiny_llama / "config.json"),
        "GPU_CHECK_ROUNDS": "1",
        "GPU_CHECK_SECONDS": "1",
        "GPU_CHECK_PROMPT": "16",
        "GPU_CHECK_NEW": "4",
        "GPU_CHECK_ADAPTERS": "3",
        **extra,
    }


@pytest.mark.e2e
def test_the_gpu_check_runs_its_cpu_rehearsal_and_writes_every_result(tmp_path, tiny_llama):
    out = tmp_path / "out"
    env = rehearsal(tmp_path, tiny_llama)
    done = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tests = (out / "cuda-tests.txt").read_text()
    assert " passed" in tests and "failed" not in tests and "skipped" not in tests, tests[-500:]
    table = (out / "table3.txt").read_text()
    assert "mapped by layer fraction" in table and "| adalora (PEFT) | 3 |" in table
    assert table.strip().splitlines()[-1].startswith("RESULT fanlora_vs_base=")
    serve = (out / "serve.txt").read_text().strip().splitlines()
    assert serve[-1].startswith("RESULT mixed_vs_one=") and " errors=0 " in serve[-1], serve[-3:]
    assert "3 distinct adapters" in "\n".join(serve)
    steps = (out / "steps.txt").read_text()
    assert "1/3" in steps and "2/3" in steps and "3/3" in steps and "done" in steps


@pytest.mark.e2e
def test_a_failing_step_does_not_stop_the_next_and_the_check_says_which_failed(tmp_path, tiny_llama):
    """One chance on a lent GPU: a bench that cannot start (a missing setting here) must not cost the serve step
    its run; the script exits 1 and names what failed."""
    env = rehearsal(tmp_path, tiny_llama, GPU_CHECK_SETTING=str(tmp_path / "missing.json"))
    done = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    steps = (tmp_path / "out" / "steps.txt").read_text()
    assert "3/3" in steps and "failed: bench serve" in steps, steps
    assert " passed" in (tmp_path / "out" / "cuda-tests.txt").read_text()
