"""Bad values reach the user as one line and exit 2, wherever they come from: a recipe, --set, or a flag."""

from __future__ import annotations

import pytest
from helpers import fail

from fanlora.config import load_config
from fanlora.errors import UserError


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["search", "--set", "search=5"], "config search is a section"),
        (["search", "--set", "search.train.max_steps=[1"], "not valid YAML"),
        (["search", "--set", "search.train.learning_rate=.nan"], "finite number"),
        (["search", "--set", "search.train.batch_size=-4"], "search.train.batch_size is -4"),
        (["evaluate", "--task", "copa", "--base", "--batch-size", "0"], "evaluate.batch_size is 0"),
        (["evaluate", "--task", "copa", "--base", "--limit", "-1"], "evaluate.limit is -1"),
        (["evaluate", "--task", "copa", "--base", "--top-p", "0"], "evaluate.top_p"),
        (["serve", "--setting", "none.json", "--port", "70000"], "--port 70000"),
        (["serve", "--setting", "none.json", "--max-batch", "0"], "--max-batch 0"),
    ],
)
def test_bad_values_exit_2_with_one_line_and_leave_nothing(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "search":
        argv = [*argv, "--run-dir", str(tmp_path / "run")]
    assert says in fail(capsys, argv)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_a_recipe_with_negative_sizes_is_refused(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("finetune:\n  train:\n    eval_batch_size: -1\n")
    with pytest.raises(UserError, match=r"finetune\.train\.eval_batch_size is -1"):
        load_config(str(recipe))


def test_the_bundled_recipes_pass_the_checks_and_say_what_they_set():
    """Every bundled recipe loads, and every value it writes is the value the loaded config holds."""
    import dataclasses
    from pathlib import Path

    import yaml

    recipes = sorted(p.stem for p in (Path(__file__).parents[1] / "fanlora" / "configs").glob("*.yaml"))
    assert {"demo", "paper", "study"} <= set(recipes)

    def leaves(node, prefix=()):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                yield from leaves(value, (*prefix, key))
        else:
            yield prefix, node

    for name in recipes:
        cfg = load_config(name)
        raw = yaml.safe_load((Path(__file__).parents[1] / "fanlora" / "configs" / f"{name}.yaml").read_text())
        for path, value in leaves(raw or {}):
            got = cfg
            for key in path:
                got = got[key] if isinstance(got, dict) else getattr(got, key)
            if dataclasses.is_dataclass(got):
                got = dataclasses.asdict(got)
            assert got == value or (isinstance(value, list) and list(got) == value), (name, path, got, value)
