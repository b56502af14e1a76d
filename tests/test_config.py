from __future__ import annotations

import pytest

from fanlora.config import load_config
from fanlora.errors import UserError


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.search.lora.r == 12 and cfg.finetune.lora.r == 12 and cfg.select.k_max == 2
    assert cfg.search.train.learning_rate == 1e-4 and cfg.search.train.warmup_ratio == 0.06
    assert cfg.search.train.patience == 10 and cfg.search.data.val_fraction == 0.01


def test_recipe_then_overrides():
    cfg = load_config("demo", ["search.train.max_steps=7", "select.k_max=3", "backbone.name=/x"])
    assert cfg.search.train.max_steps == 7 and cfg.select.k_max == 3 and cfg.backbone.name == "/x"
    assert cfg.search.train.batch_size == 8  # from the recipe
    assert cfg.finetune.train.epochs == 2.0


@pytest.mark.parametrize(
    "override, needle",
    [
        (["search.train.max_step=7"], "unknown config key search.train.max_step"),
        (["select.k_max=two"], "must be an integer"),
        (["nonsense"], "not key=value"),
    ],
)
def test_bad_overrides(override, needle):
    with pytest.raises(UserError, match=needle):
        load_config(None, override)


def test_unknown_recipe():
    with pytest.raises(UserError, match="one of demo, paper"):
        load_config("nope")
