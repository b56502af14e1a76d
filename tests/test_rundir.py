from __future__ import annotations

import pytest

from fanlora.errors import UserError
from fanlora.stages import rundir

A = {"backbone": {"name": "a"}, "search": {"x": 1}, "score": {"y": 1}}
B = {"backbone": {"name": "a"}, "search": {"x": 2}, "score": {"y": 1}}


def test_same_config_continues_and_different_is_refused(tmp_path):
    run = tmp_path / "run"
    assert rundir.prepare(run, A, ["backbone", "search"]) == A
    (run / "marker").write_text("x")
    assert rundir.prepare(run, A, ["backbone", "search"]) == A
    with pytest.raises(UserError, match=r"holds a different run \(config differs in search.x\)"):
        rundir.prepare(run, B, ["backbone", "search"])
    assert (run / "marker").exists()


def test_resume_uses_stored_config_and_overwrite_starts_again(tmp_path):
    run = tmp_path / "run"
    rundir.prepare(run, A, ["search"])
    (run / "marker").write_text("x")
    assert rundir.prepare(run, B, ["search"], resume=True) == A
    assert rundir.prepare(run, B, ["search"], overwrite=True) == B
    assert not (run / "marker").exists()


def test_only_relevant_sections_count(tmp_path):
    run = tmp_path / "run"
    rundir.prepare(run, A, ["backbone", "search"])
    changed = {**A, "score": {"y": 5}}
    assert rundir.prepare(run, changed, ["backbone", "search"])["score"] == {"y": 1}


def test_foreign_directory_is_never_touched(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not a fanlora run"):
        rundir.prepare(tmp_path, A, ["search"], overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_which_values_are_per_command_comes_from_the_config_fields():
    """PER_COMMAND is read from the fields' flag metadata, not a hand list beside them."""
    from fanlora.config import per_command_keys

    assert set(rundir.PER_COMMAND) == set(per_command_keys())
    assert {"score.method", "score.seed"} <= set(rundir.PER_COMMAND)
    assert not [k for k in rundir.PER_COMMAND if not k.startswith("score.")]  # a task or recipe value never is
