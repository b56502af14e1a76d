"""`fanlora score --method/--shard`, `fanlora scores compare|merge`, `fanlora stability` as a user runs them."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from helpers import copy_run, fail, tiny_recipe

from fanlora.cli import main
from fanlora.config import load_config
from fanlora.errors import UserError
from fanlora.stages.score import run_score


@pytest.fixture(scope="module")
def searched(tmp_path_factory, searched_run):
    """A run directory with stage a done and the paper's AB-score computed (a copy of the session's)."""
    recipe, run = searched_run
    return recipe, copy_run(run, tmp_path_factory.mktemp("score-cli") / "run")


def scores(path) -> dict[str, float]:
    return {f"{r['kind']}.{r['layer']}": r["score"] for r in json.loads(path.read_text())["scores"]}


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["sensitivity", "ab-first-order", "shapley"])
def test_other_methods_write_their_own_file_and_feed_select(searched, method, capsys):
    _, run = searched
    extra = ["--budget", "2"] if method == "shapley" else []
    assert main(["score", "--run-dir", str(run), "--scorer", method, *extra]) == 0
    data = json.loads((run / f"scores-{method}.json").read_text())
    assert data["method"] == method and len(data["scores"]) == 14
    assert not list(run.glob(f"scores-{method}.partial.*"))
    out = run / f"setting-{method}.json"
    assert main(["select", "--scores", str(run / f"scores-{method}.json"), "--out", str(out), "--no-plots"]) == 0
    assert json.loads(out.read_text())["source"]["method"] == method
    assert scores(run / "scores.json")  # the AB-score of the same run is untouched


@pytest.mark.e2e
def test_shards_merge_to_the_single_process_scores(searched, tmp_path, capsys):
    _, run = searched
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for f in copy.glob("scores*"):
        f.unlink()
    for i in range(2):
        assert main(["score", "--run-dir", str(copy), "--shard", f"{i}/2"]) == 0
    shards = sorted(copy.glob("scores.shard-*-of-2.json"))
    assert len(shards) == 2 and not (copy / "scores.json").exists()
    err = fail(capsys, ["scores", "merge", str(shards[0]), "--out", str(tmp_path / "half.json")])
    assert "incomplete" in err and not (tmp_path / "half.json").exists()
    assert main(["scores", "merge", *map(str, shards), "--out", str(tmp_path / "merged.json")]) == 0
    merged, single = scores(tmp_path / "merged.json"), scores(run / "scores.json")
    assert max(abs(merged[k] - single[k]) for k in single) < 1e-6
    # a shard of another study (another method) is refused
    assert main(["score", "--run-dir", str(copy), "--shard", "0/2", "--scorer", "sensitivity"]) == 0
    other = copy / "scores-sensitivity.shard-0-of-2.json"
    err = fail(capsys, ["scores", "merge", str(shards[0]), str(other), "--out", str(tmp_path / "x.json")])
    assert "another study" in err and not (tmp_path / "x.json").exists()


@pytest.mark.e2e
def test_bad_scoring_options(searched, capsys):
    _, run = searched
    assert "at least 1 permutation" in fail(
        capsys, ["score", "--run-dir", str(run), "--scorer", "shapley", "--budget", "0"]
    )
    assert "unknown scoring method" in fail(capsys, ["score", "--run-dir", str(run), "--scorer", "magic"])
    assert "is not I/N" in fail(capsys, ["score", "--run-dir", str(run), "--shard", "2/2"])
    assert not list(run.glob("scores*.partial.*")) and not list(run.glob("scores-magic*"))


@pytest.mark.e2e
def test_no_response_tokens_is_refused(searched, tmp_path):
    recipe, run = searched
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "scores.json").unlink()
    cfg = load_config(str(recipe), ["search.data.max_length=4"])  # every response cut off by the prompt
    with pytest.raises(UserError, match="no example keeps a response token"):
        run_score(cfg, copy, progress=False)
    assert not (copy / "scores.json").exists() and not list(copy.glob("scores.partial.*"))


@pytest.mark.e2e
def test_compare_prints_the_matrices(searched, tmp_path, capsys):
    _, run = searched
    assert main(["score", "--run-dir", str(run), "--scorer", "sensitivity"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp.json"
    assert (
        main(["scores", "compare", str(run / "scores.json"), str(run / "scores-sensitivity.json"), "--out", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "Spearman" in text and "Kendall" in text and "Overlap" in text
    result = json.loads(out.read_text())
    assert result["spearman"][0][0] == 1.0 and -1.0 <= result["spearman"][0][1] <= 1.0


@pytest.mark.e2e
def test_select_refuses_scores_of_another_backbone(searched, tmp_path, tiny_llama_other, capsys):
    _, run = searched
    out = tmp_path / "setting.json"
    argv = ["select", "--scores", str(run / "scores.json"), "--out", str(out), "--backbone", str(tiny_llama_other)]
    assert "score this backbone first" in fail(capsys, argv)
    assert not out.exists()


@pytest.mark.e2e
def test_stability_over_two_seeds(tmp_path, tiny_llama, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_llama)))
    argv = ["stability", "--config", str(recipe), "--run-dir", str(tmp_path / "st"), "--seeds", "0", "1"]
    argv += ["--scorer", "ab-first-order"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT seeds=2 spearman_min=")
    result = json.loads((tmp_path / "st" / "stability.json").read_text())
    assert result["seeds"] == [0, 1] and result["names"] == ["seed 0", "seed 1"]
    assert (tmp_path / "st" / "seed-1" / "scores-ab-first-order.json").is_file()
    err = fail(capsys, ["stability", "--config", str(recipe), "--run-dir", str(tmp_path / "s2"), "--seeds", "0"])
    assert "at least two different seeds" in err and not (tmp_path / "s2").exists()


@pytest.mark.e2e
def test_tiny_memory_limit_chunks_with_the_same_scores(searched, tmp_path):
    _, run = searched
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "scores.json").unlink()
    assert main(["score", "--run-dir", str(copy), "--memory-limit-gb", "1e-9"]) == 0  # one batch per chunk
    chunked, whole = scores(copy / "scores.json"), scores(run / "scores.json")
    assert max(abs(chunked[k] - whole[k]) for k in whole) < 1e-6


@pytest.mark.e2e
def test_split_half_scores_one_adapter_on_two_disjoint_val_halves(tmp_path, tiny_llama, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_llama)))
    run = tmp_path / "sh"
    argv = ["stability", "--config", str(recipe), "--run-dir", str(run), "--seeds", "3", "--split-half"]
    argv += ["--scorer", "ab-first-order", "--set", "score.max_val_examples=2"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT split_half_spearman=")
    halves = [json.loads((run / "seed-3" / f"half-{h}" / "scores-ab-first-order.json").read_text()) for h in (0, 1)]
    metas = halves  # the scoring metadata sits at the top level of a scores file
    assert [m["val"]["start"] for m in metas] == [0, 2] and [m["val"]["n_examples"] for m in metas] == [2, 2]
    assert metas[0]["val"]["fingerprint"] != metas[1]["val"]["fingerprint"]  # other examples
    assert metas[0]["adapter_sha256_16"] == metas[1]["adapter_sha256_16"]  # the same stage-a adapter
    assert json.loads((run / "split-half.json").read_text())["examples_per_half"] == 2
    bad = ["stability", "--config", str(recipe), "--run-dir", str(tmp_path / "x"), "--split-half"]
    assert "score.max_val_examples" in fail(capsys, [*bad, "--set", "score.max_val_examples=null"])
    assert not (tmp_path / "x").exists()


@pytest.mark.e2e
def test_a_val_start_past_the_val_set_is_refused(searched, tmp_path):
    recipe, run = searched
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "scores.json").unlink()
    with pytest.raises(UserError, match="skips all"):
        run_score(load_config(str(recipe), ["score.val_start=100000"]), copy, progress=False)


def test_score_method_is_a_deprecated_alias_of_scorer(capsys):
    from fanlora.cli import build_parser

    args = build_parser().parse_args(["score", "--method", "sensitivity"])
    assert "--method is deprecated here: use --scorer" in capsys.readouterr().err
    assert args == build_parser().parse_args(["score", "--scorer", "sensitivity"])
    score_help = build_parser()._subparsers._group_actions[0].choices["score"].format_help()
    assert "--scorer" in score_help and "--method" not in score_help  # the old name is hidden from --help
