"""Shared fixtures: tiny random models (same architectures as the real ones) and a tiny recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_llama_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different weights: a setting from one must be refused on the other."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama-other", "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_llama_3layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama-3", "llama", layers=3)


def fail(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI expecting bad input: exit 2, one line on stderr, no traceback; returns that line."""
    from fanlora.cli import main

    capsys.readouterr()  # drop earlier commands' output (progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def tiny_recipe(model: Path) -> dict:
    """A recipe that runs every stage on the tiny model in seconds."""
    return {
        "backbone": {"name": str(model)},
        "search": {
            "data": {"max_length": 96, "max_train_examples": 24},
            "train": {
                "batch_size": 4,
                "max_steps": 4,
                "eval_steps": 2,
                "eval_batch_size": 16,
                "learning_rate": 1e-2,
                "logging_steps": 1,
            },
        },
        "score": {"max_val_examples": 4, "batch_size": 2},
        "finetune": {
            "max_length": 48,
            "max_train_examples": 16,
            "train": {"batch_size": 8, "epochs": 1, "eval_steps": 2, "eval_batch_size": 25, "learning_rate": 1e-2},
        },
        "evaluate": {"limit": 8, "batch_size": 8},
    }


@pytest.fixture
def recipe_file(tmp_path: Path, tiny_llama: Path) -> Path:
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_llama)))
    return path


@pytest.fixture(scope="session")
def searched_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> tuple[Path, Path]:
    """(recipe, run): stages a and b of the tiny recipe, run once per session through the CLI.

    Modules that go on from it copy the run directory first (:func:`copy_run`), so none sees another's files.
    """
    import yaml

    from fanlora.cli import main

    root = tmp_path_factory.mktemp("searched")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_llama)))
    run = root / "run"
    assert main(["search", "--config", str(recipe), "--run-dir", str(run)]) == 0
    assert main(["score", "--run-dir", str(run)]) == 0
    return recipe, run


def copy_run(run: Path, where: Path) -> Path:
    import shutil

    shutil.copytree(run, where)
    return where
