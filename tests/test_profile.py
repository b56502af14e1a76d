"""`fanlora profile` on the tiny model: what it writes and how select and bench use it (no test times anything)."""

from __future__ import annotations

import json

import pytest
from helpers import fail, setting_for

from fanlora.backbone import load_backbone
from fanlora.latency import profile as latency


@pytest.fixture(scope="module")
def profiled(tiny_llama, tmp_path_factory):
    """A one-round profile of the tiny model written where `select --budget latency` looks for it."""
    import os

    from fanlora.cli import main

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FANLORA_CACHE")
    os.environ["FANLORA_CACHE"] = str(cache)
    try:
        argv = ["profile", "--backbone", str(tiny_llama), "--rounds", "2", "--prompt-tokens", "8", "--steps", "2"]
        assert main(argv) == 0
        backbone = load_backbone(str(tiny_llama))
        path = latency.default_path(backbone.identity)
        yield cache, path, json.loads(path.read_text())
    finally:
        if old is None:
            os.environ.pop("FANLORA_CACHE", None)
        else:
            os.environ["FANLORA_CACHE"] = old


def test_profile_has_every_kind_and_predicts_a_sum(profiled, tiny_llama):
    _, path, prof = profiled
    backbone = load_backbone(str(tiny_llama))
    assert prof["format"] == latency.PROFILE_FORMAT and path.name.startswith(backbone.identity["weights_digest"])
    assert list(prof["kinds"]) == backbone.layout.kinds
    for kind in prof["kinds"].values():
        assert len(kind["ratios"]) == 2 and kind["ratio"]["median"] > 0
        assert kind["per_module"] == pytest.approx((kind["ratio"]["median"] - 1) / backbone.layout.num_layers)
    setting = setting_for(backbone, ("V", "O"))
    want = sum(max(0.0, prof["kinds"][k]["per_module"]) for k in ("V", "O")) * backbone.layout.num_layers
    assert latency.predict(setting, prof) == pytest.approx(want)


@pytest.mark.e2e
def test_latency_budget_uses_the_cached_profile(profiled, searched_run, tmp_path, monkeypatch):
    from fanlora.cli import main

    cache, path, prof = profiled
    monkeypatch.setenv("FANLORA_CACHE", str(cache))
    _, run = searched_run
    per_module = [max(0.0, k["per_module"]) for k in prof["kinds"].values()]
    room = max(max(per_module) * 3, 1e-4)  # at least a few modules fit
    out = tmp_path / "s.json"
    argv = ["select", "--scores", str(run / "scores.json"), "--budget", f"latency={room * 100:.4f}%", "--out", str(out)]
    assert main(argv) == 0
    b = json.loads(out.read_text())["source"]["budget"]
    assert b["unit"] == "latency" and b["profile"] == str(path)
    assert b["predicted_cost"] <= b["value"] + 1e-12


def test_profile_of_another_backbone_is_refused(profiled, tiny_llama_other, tmp_path, capsys):
    _, path, _ = profiled
    other = load_backbone(str(tiny_llama_other))
    with pytest.raises(Exception, match="profiles another backbone"):
        latency.find_profile(other.identity, path)
    assert "must be ≥ 1" in fail(capsys, ["profile", "--backbone", str(tiny_llama_other), "--rounds", "0"])


@pytest.mark.e2e
def test_bench_puts_the_prediction_beside_the_measurement(profiled, tiny_llama, tmp_path, monkeypatch):
    from fanlora.cli import main

    cache, _, prof = profiled
    monkeypatch.setenv("FANLORA_CACHE", str(cache))
    backbone = load_backbone(str(tiny_llama))
    setting = setting_for(backbone)
    setting.write(tmp_path / "setting.json")
    out = tmp_path / "bench.txt"
    argv = ["bench", "--setting", str(tmp_path / "setting.json"), "--backbone", str(tiny_llama), "--rounds", "1"]
    argv += ["--prompt-tokens", "8", "--new-tokens", "2", "--tenants", "2", "--out", str(out)]
    assert main(argv) == 0
    report = out.read_text()
    line = next(x for x in report.splitlines() if x.startswith("latency: profile"))
    assert f"predicts {latency.predict(setting, prof) * 100:+.2f}%" in line
    result = dict(kv.split("=") for kv in report.strip().splitlines()[-1].split()[1:])
    assert float(result["latency_predicted"]) == pytest.approx(latency.predict(setting, prof), abs=1e-3)


def test_step_runner_times_the_same_position_every_call(tiny_llama):
    from fanlora.latency.timing import prompt_ids, step_runner

    backbone = load_backbone(str(tiny_llama))
    seen: list[int] = []
    forward = backbone.model.forward

    def spy(*args, **kwargs):
        cache = kwargs.get("cache")
        seen.append(0 if cache is None else cache.get_seq_length())
        return forward(*args, **kwargs)

    backbone.model.forward = spy
    ids = prompt_ids(backbone.tokenizer, 9)
    run = step_runner(backbone.model, ids, steps=3)
    run()
    run()
    assert seen[0] == 0 and seen[1:] == [ids.shape[1]] * 6  # prefill once, then six steps at the same length


def test_a_profile_below_the_noise_says_so():
    clear = {"kinds": {"Q": {"per_module_ci": [0.001, 0.002]}}, "noise": {"ci": [0.99, 1.01]}}
    assert latency.resolution_warning(clear) is None
    hidden = {"kinds": {"Q": {"per_module_ci": [-0.001, 0.002]}}, "noise": {"ci": [0.99, 1.01]}}
    assert "1 of 1 kinds' costs are not distinguishable from zero" in latency.resolution_warning(hidden)
    biased = {"kinds": {"Q": {"per_module_ci": [0.001, 0.002]}}, "noise": {"ci": [0.95, 0.98]}}
    assert "timed against itself differs" in latency.resolution_warning(biased)
