"""A careless operator's inputs: each is one `error:` line and exit 2, no traceback, nothing half-made.

Before their fixes: a 433-byte recipe of nested YAML aliases ran for minutes and wrote a 39 MB run.json;
non-UTF-8 or deeply nested artifacts, a setting with a key missing and a corrupt run.json were tracebacks;
a full or read-only disk was a traceback; a failed finetune left a run folder holding only run.json.
"""

from __future__ import annotations

import errno
import json

import pytest
from helpers import fail

from fanlora import atomic

LEVELS = list(zip("abcdefgh", "bcdefghi", strict=True))
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n"
BOMB += "".join(f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n" for p, c in LEVELS)
BOMB += "backbone: {module_map: *i}\n"


def test_a_recipe_of_nested_aliases_is_refused_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    assert len(BOMB) < 600
    err = fail(capsys, ["search", "--config", str(recipe), "--run-dir", str(tmp_path / "run")])
    assert "expands to more than 100,000 values" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b'{"format": "fanlora-scores-v1", "x": "\xe9"}', "not UTF-8"),
     (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"), (b"{", "not valid JSON")],
)  # fmt: skip
def test_malformed_scores_and_settings_are_one_line(tmp_path, capsys, content, reason):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    assert reason in fail(capsys, ["select", "--scores", str(bad), "--out", str(tmp_path / "s.json")])
    assert not (tmp_path / "s.json").exists()


@pytest.mark.e2e
def test_a_setting_with_a_key_missing_is_one_line(searched_run, tmp_path, capsys):
    from fanlora.setting import Setting

    _, run = searched_run
    good = tmp_path / "setting.json"
    from fanlora.cli import main

    assert main(["select", "--scores", str(run / "scores.json"), "--out", str(good), "--no-plots"]) == 0
    data = json.loads(good.read_text())
    del data["module_paths"]
    good.write_text(json.dumps(data))
    with pytest.raises(Exception) as info:
        Setting.read(good)
    assert "damaged setting file" in str(info.value) and "KeyError" in str(info.value)


@pytest.mark.e2e
def test_a_corrupt_run_json_is_one_line(searched_run, tmp_path, capsys):
    recipe, _ = searched_run
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "run.json").write_bytes(b"\xff\xfe not json")
    err = fail(capsys, ["search", "--config", str(recipe), "--run-dir", str(broken)])
    assert "run.json is not UTF-8 text" in err and "--overwrite" in err


@pytest.mark.e2e
def test_a_full_disk_is_one_line_naming_the_path(searched_run, tmp_path, capsys, monkeypatch):
    _, run = searched_run
    out = tmp_path / "setting.json"

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "write_bytes", full)
    err = fail(capsys, ["select", "--scores", str(run / "scores.json"), "--out", str(out), "--no-plots"])
    assert "No space left on device" in err and str(out) in err and not out.exists()


def test_a_finetune_that_fails_leaves_no_run_folder(tiny_llama, tmp_path, capsys, monkeypatch):
    from helpers import setting_for

    from fanlora.backbone import load_backbone
    from fanlora.stages import finetune as adapt

    setting = tmp_path / "setting.json"
    setting_for(load_backbone(str(tiny_llama))).write(setting)

    def crash(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr(adapt, "train_adapter", crash)
    run = tmp_path / "run"
    err = fail(capsys, ["finetune", "--task", "copa", "--backbone", str(tiny_llama), "--setting", str(setting),
                        "--run-dir", str(run), "--set", "finetune.max_train_examples=4"])  # fmt: skip
    assert "Read-only file system" in err and not run.exists()
