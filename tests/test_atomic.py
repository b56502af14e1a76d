"""Atomic artifact writes: all or nothing, public modes, no temporary files left behind."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fanlora import atomic
from fanlora.errors import UserError


def test_a_write_replaces_the_file_whole_with_the_umask_modes(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic.write_json(tmp_path / "sub" / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"x": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # what open() would give, not mkstemp's 0600
    atomic.write_jsonl(path, [{"a": 1}, {"b": 2}])
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(TypeError):
        atomic.write_json(path, {"not json": object()})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_publish_tree_gives_directories_and_files_public_modes(tmp_path):
    import tempfile

    made = tempfile.mkdtemp(dir=tmp_path)  # 0700, as mkdtemp makes it
    (tmp_path / made / "f").write_text("x")
    os.chmod(tmp_path / made / "f", 0o600)
    old = os.umask(0o022)
    try:
        atomic.publish_tree(made)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(made, "f")).st_mode) == 0o644


def test_read_artifact_names_every_way_it_can_be_wrong(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        atomic.read_artifact(tmp_path / "none.json", "fmt/1", "scores", "fanlora score")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        atomic.read_artifact(tmp_path / "bad.json", "fmt/1", "scores", "fanlora score")
    (tmp_path / "other.json").write_text('{"format": "other/1"}')
    with pytest.raises(UserError, match="not a fanlora scores file"):
        atomic.read_artifact(tmp_path / "other.json", "fmt/1", "scores", "fanlora score")
