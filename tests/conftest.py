"""Shared fixtures only: tiny random models (same architectures as the real ones), a tiny recipe, a searched run.
Every helper function is in ``helpers.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny_recipe
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


_running: list[pytest.Item] = []  # the test whose setup, call or teardown runs now


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _running[:] = [item]
    yield
    _running.clear()


@pytest.fixture(scope="session", autouse=True)
def _training_is_marked():
    """A test that trains (transformers' Trainer, which every fanlora training goes through) — in its own body
    or in a fixture it sets up — must carry the ``e2e`` or ``slow`` marker, so ``scripts/test.sh --fast`` can
    leave it out; an unmarked one fails at the moment it starts training."""
    from transformers import Trainer

    real = Trainer.train

    def train(self, *args, **kwargs):
        item = _running[0] if _running else None
        if item is not None and not (item.get_closest_marker("e2e") or item.get_closest_marker("slow")):
            raise AssertionError(f"{item.nodeid} trains: mark it @pytest.mark.e2e (scripts/test.sh --fast skips it)")
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train", train)
        yield
