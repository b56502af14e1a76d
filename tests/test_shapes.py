"""Shape-only backbones (``--backbone shape:…``): random weights of a public architecture, for timing only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fanlora.backbone import TOKENIZER_ENV, load_backbone, shapes
from fanlora.cli import main
from fanlora.errors import UserError
from fanlora.setting import Setting


class _Vocab:
    """A stand-in tokenizer: only its length matters to :func:`shapes.build`."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


#: parameters of each bundled shape with its own vocabulary (the public models' published sizes), and the
#: embedded tokenizer's 49152 tokens (Llama-2's 32000 is raised to fit it)
PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "qwen1.5-7b": 7_721_324_544,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-0.5b": 494_032_768,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_bundled_shapes_have_the_public_models_parameter_counts(name):
    """Built on the meta device (no memory, no init): the architecture is the public one, parameter for
    parameter — so a timing on it is a timing of that model's shape."""
    _, data = shapes.read_config(f"shape:{name}")
    model, ident = shapes.build(f"shape:{name}", torch.bfloat16, torch.device("meta"), _Vocab(data["vocab_size"]))
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert ident["weights"] == "random" and ident["config_vocab_size"] == data["vocab_size"]
    assert next(model.parameters()).dtype == torch.bfloat16


def test_a_smaller_vocabulary_is_raised_to_fit_the_tokenizer():
    model, ident = shapes.build("shape:llama-2-7b", torch.float32, torch.device("meta"), _Vocab(49152))
    assert model.config.vocab_size == 49152 and ident["config_vocab_size"] == 32000
    assert sum(p.numel() for p in model.parameters()) == PARAMS["llama-2-7b"] + 2 * 4096 * (49152 - 32000)


def test_shape_of_a_config_file_builds_in_the_dtype_with_a_random_identity(tiny_llama):
    shape = f"shape:{tiny_llama / 'config.json'}"
    a = load_backbone(shape, "bfloat16", random_ok=True)
    b = load_backbone(shape, "bfloat16", random_ok=True)
    assert {p.dtype for p in a.model.parameters()} == {torch.bfloat16}
    assert a.identity["weights"] == "random" and a.identity["weights_digest"].startswith("random-")
    assert a.identity["weights_digest"] == b.identity["weights_digest"]  # a fixed seed: the same weights
    real = load_backbone(str(tiny_llama))
    assert real.identity["weights_digest"] != a.identity["weights_digest"]
    assert real.layout.paths == a.layout.paths and real.layout.num_layers == a.layout.num_layers


@pytest.mark.parametrize("bad", ["shape:", "shape:no-such-shape", "shape:/nonexistent/config.json"])
def test_an_unknown_shape_is_one_line_naming_the_bundled_ones(bad):
    with pytest.raises(UserError, match=r"llama-2-7b, qwen1\.5-7b"):
        shapes.read_config(bad)


def test_a_config_without_model_type_is_refused(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UserError, match="no model_type"):
        shapes.read_config(f"shape:{tmp_path / 'c.json'}")


def test_a_shape_is_refused_unless_the_caller_only_times_it():
    with pytest.raises(UserError, match="random weights: it is for timing"):
        load_backbone("shape:smollm2-135m")


@pytest.mark.parametrize(
    "argv",
    [
        ["search", "--backbone", "shape:smollm2-135m"],
        ["finetune", "--backbone", "shape:smollm2-135m", "--method", "lora", "--task", "copa"],
        ["evaluate", "--backbone", "shape:smollm2-135m", "--base", "--task", "copa"],
    ],
)
def test_training_commands_refuse_a_shape_with_one_line_and_write_nothing(argv, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*argv, "--run-dir" if argv[0] != "evaluate" else "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "random weights" in err[0], err
    assert not run.exists()


def _setting(layers: int, kept: dict[int, list[str]]) -> Setting:
    return Setting(
        backbone={"name": "real", "public_name": "org/real", "model_type": "llama", "weights_digest": "abc"},
        layers_path="model.layers",
        num_layers=layers,
        module_paths={k: f"self_attn.{k.lower()}_proj" for k in ("Q", "K", "V")}
        | {"O": "self_attn.o_proj", "G": "mlp.gate_proj", "U": "mlp.up_proj", "D": "mlp.down_proj"},
        k_max=2,
        kept=kept,
    )


def test_a_real_setting_maps_onto_a_shape_by_layer_fraction(tiny_llama_3layers):
    """Source layer t·m // n: a 6-layer pattern onto 3 layers keeps layers 0, 2 and 4."""
    probe = load_backbone(f"shape:{tiny_llama_3layers / 'config.json'}", random_ok=True)
    real = _setting(6, {0: ["Q", "V"], 1: ["K"], 2: ["D"], 3: [], 4: ["U", "G"], 5: ["O"]})
    mapped = real.fitted_to(probe)
    assert mapped.kept == {0: ["Q", "V"], 1: ["D"], 2: ["U", "G"]}
    assert mapped.backbone == probe.identity and mapped.source["rule"] == "mapped by layer fraction"
    assert mapped.source["from_backbone"] == "org/real" and mapped.source["from_layers"] == 6
    assert mapped.fitted_to(probe) is mapped  # made for this backbone: only validated


def test_a_real_backbone_never_takes_another_backbones_setting(tiny_llama, tiny_llama_other):
    """Mapping is for random weights only: on a real model a foreign setting is refused, as before."""
    real = load_backbone(str(tiny_llama))
    other = _setting(2, {0: ["Q"], 1: ["V"]})
    other.backbone = dict(load_backbone(str(tiny_llama_other)).identity)
    with pytest.raises(UserError, match="select a setting from scores of this backbone"):
        other.fitted_to(real)


def test_profile_of_a_bf16_shape_is_cached_apart_from_the_float32_cpu_one(tiny_llama, monkeypatch, tmp_path):
    from fanlora.latency import profile as latency

    monkeypatch.setenv("FANLORA_CACHE", str(tmp_path))
    monkeypatch.setenv(TOKENIZER_ENV, str(tiny_llama))  # a fresh cache would convert the embedded GGUF again
    probe = load_backbone(f"shape:{tiny_llama / 'config.json'}", "bfloat16", random_ok=True)
    fp32 = load_backbone(str(tiny_llama))
    assert latency.default_path(probe.identity).name.endswith(f"-bfloat16-cpu-t{torch.get_num_threads()}.json")
    assert "-float32-" not in latency.default_path(fp32.identity).name  # the CPU fp32 profile keeps its path


def test_serve_loads_a_shape_with_the_setting_mapped(tiny_llama, tiny_llama_3layers):
    from fanlora.serving.server import load_engine

    setting = _setting(6, {n: ["V"] for n in range(6)})
    engine = load_engine(setting, f"shape:{tiny_llama_3layers / 'config.json'}", 16, dtype="bfloat16")
    assert engine.identity["weights"] == "random" and engine.setting.n_modules == 3
    assert next(engine.model.parameters()).dtype == torch.bfloat16


@pytest.mark.e2e
def test_bench_runs_table3_on_a_shape_and_says_the_setting_is_mapped(tiny_llama, tmp_path, capsys):
    """`fanlora bench --backbone shape:…` end to end (tiny shape, one round): every configuration of Table 3,
    beam 1 and 3, the mapping stated, the RESULT line."""
    setting = _setting(6, {n: ["Q", "V"] for n in range(6)})
    setting.backbone = {"name": "real", "public_name": "org/real", "model_type": "llama", "weights_digest": "x"}
    path = setting.write(tmp_path / "setting.json")
    out = tmp_path / "bench.txt"
    argv = ["bench", "--setting", str(path), "--backbone", f"shape:{tiny_llama / 'config.json'}", "--rounds", "1"]
    argv += ["--prompt-tokens", "16", "--new-tokens", "4", "--tenants", "2", "--dtype", "bfloat16", "--out", str(out)]
    assert main(argv) == 0
    text = Path(out).read_text()
    assert "mapped by layer fraction to 2 layers, 4 modules" in text
    for name in ("base", "fanlora (engine)", "fanlora (PEFT)", "lora all (PEFT)", "adalora (PEFT)", "ia3 (PEFT)"):
        assert f"| {name} | 1 |" in text and f"| {name} | 3 |" in text
    assert "RESULT fanlora_vs_base=" in text and "mixed_vs_single=" in text


def test_profile_times_a_shape_in_bf16_and_caches_it_apart(tiny_llama, monkeypatch, tmp_path):
    """`fanlora profile --backbone shape:… --dtype bfloat16` end to end (2 rounds of 2 steps): every kind costed,
    the profile under the bf16/CPU path, its backbone the random one."""
    from fanlora.latency import profile as latency

    monkeypatch.setenv("FANLORA_CACHE", str(tmp_path))
    monkeypatch.setenv(TOKENIZER_ENV, str(tiny_llama))  # a fresh cache would convert the embedded GGUF again
    shape = f"shape:{tiny_llama / 'config.json'}"
    argv = [
        "profile",
        "--backbone",
        shape,
        "--rounds",
        "2",
        "--prompt-tokens",
        "8",
        "--steps",
        "2",
        "--dtype",
        "bfloat16",
    ]
    assert main(argv) == 0
    probe = load_backbone(shape, "bfloat16", random_ok=True)
    prof = json.loads(latency.default_path(probe.identity).read_text())
    assert prof["backbone"]["weights"] == "random" and set(prof["kinds"]) == set(probe.layout.kinds)
