"""A scorer is one file that registers itself: a throwaway scorer defined in this file alone runs through
``fanlora score --method``, writes its own scores file, and feeds ``fanlora select``."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import copy_run

from fanlora.cli import build_parser, main
from fanlora.errors import UserError
from fanlora.scoring import scorers


class UpdateNorm(scorers.Scorer):
    """‖B·A‖ of each stage-a LoRA update: one unit of work, no validation pass at all."""

    name = "update-norm"
    summary = "size of the stage-a update"

    def units(self, study, rank, world):
        return [0] if rank == 0 else []

    def cost(self, study):
        return 1

    def compute(self, study, gated, batches, progress, units, memory_limit, tick):
        norms = {}
        for key, name in study.module_names.items():
            m = gated.model.get_base_model().get_submodule(name)
            norms[key] = float(torch.linalg.matrix_norm(m.lora_B["default"].weight @ m.lora_A["default"].weight))
        progress.record({"id": "norms", "norm": norms})
        tick(1)

    def assemble(self, study, entries):
        return entries["norms"]["norm"], {}, None, None


@pytest.fixture
def update_norm():
    scorer = scorers.register(UpdateNorm())
    yield scorer
    scorers.unregister(scorer.name)


@pytest.mark.e2e
def test_registered_scorer_scores_and_feeds_select(searched_run, tmp_path, update_norm):
    run = copy_run(searched_run[1], tmp_path / "run")
    assert main(["score", "--run-dir", str(run), "--scorer", "update-norm"]) == 0
    data = json.loads((run / "scores-update-norm.json").read_text())
    assert data["method"] == "update-norm" and len(data["scores"]) == 14
    assert all(r["score"] > 0 for r in data["scores"])  # stage a trained every module away from B = 0
    out = tmp_path / "setting.json"
    assert main(["select", "--scores", str(run / "scores-update-norm.json"), "--out", str(out), "--no-plots"]) == 0
    assert json.loads(out.read_text())["source"]["method"] == "update-norm"


def test_score_help_lists_every_registered_scorer(update_norm, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(name in shown for name in scorers.names()) and "update-norm: size of the stage-a update" in shown


def test_unknown_scorer_is_one_line(update_norm):
    with pytest.raises(UserError, match=r"unknown scoring method 'magic': choose one of ab-exact, .*update-norm"):
        scorers.get("magic")


def test_the_study_meets_the_contract_scorers_are_typed_against():
    """The registry's Study protocol names what a scorer may read; the real study must offer all of it."""
    from dataclasses import fields

    from fanlora.scoring.scorers.registry import Study as Contract
    from fanlora.scoring.study import Study

    def members(cls):
        return set(getattr(cls, "__annotations__", {})) | {n for n, v in vars(cls).items() if isinstance(v, property)}

    offered = {f.name for f in fields(Study)} | members(Study)
    assert members(Contract) - {"__module__"} <= offered
    assert {"keys", "players", "n_batches", "options"} <= members(Contract)
