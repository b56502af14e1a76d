"""Each default once: the CLI's config flags are generated from the config's fields (option, type, choices,
default and range in the help), and a flag is exactly a ``--set section.key=value`` override."""

from __future__ import annotations

import dataclasses

import pytest

from fanlora import commands
from fanlora.cli import build_parser
from fanlora.config import Config, EvaluateConfig, ScoreConfig, cli_flags, load_config
from fanlora.generate import Decoding


@pytest.mark.parametrize("section, cls", [("evaluate", EvaluateConfig), ("score", ScoreConfig)])
def test_flags_come_from_the_fields(section, cls):
    flags = cli_flags(section)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert flags and all(f.key in fields for f in flags)
    for f in flags:
        default = fields[f.key].default
        assert f"config {section}.{f.key}" in f.help and f"default {'null' if default is None else default}" in f.help
    assert "≥ 1" in next(f.help for f in cli_flags("evaluate") if f.key == "num_beams")  # the range, from config


def test_a_flag_is_the_same_as_its_override():
    argv = ["evaluate", "--task", "copa", "--base", "--num-beams", "5", "--sample-seed", "3", "--top-p", "0.5"]
    via_flags = commands.config_for(build_parser().parse_args(argv))
    via_set = load_config(None, ["evaluate.num_beams=5", "evaluate.seed=3", "evaluate.top_p=0.5"])
    assert via_flags.to_dict() == via_set.to_dict() != Config().to_dict()
    score = commands.config_for(
        build_parser().parse_args(["score", "--scorer", "shapley", "--memory-limit-gb", "1e-9"])
    )
    assert (score.score.method, score.score.memory_limit_gb) == ("shapley", 1e-9)


def test_decoding_defaults_are_the_recipes():
    ev, d = EvaluateConfig(), Decoding()
    assert (d.strategy, d.num_beams, d.temperature, d.top_p, d.seed) == (
        ev.decoding,
        ev.num_beams,
        ev.temperature,
        ev.top_p,
        ev.seed,
    )
