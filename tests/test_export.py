"""`fanlora export`: the setting for engines without fanlora — vLLM's per-layer names, SGLang's kinds, PEFT."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import fail, setting_for

from fanlora.backbone import load_backbone
from fanlora.cli import main
from fanlora.serving.export import export, peft_config, vllm_target_modules

PATTERN = [("V", "O"), ("Q", "G"), ("K", "D")]  # layer n keeps PATTERN[n % 3]


@pytest.fixture
def mixed(tiny_llama, tmp_path):
    backbone = load_backbone(str(tiny_llama))
    base = setting_for(backbone)
    setting = dataclasses.replace(base, kept={n: list(PATTERN[n % 3]) for n in range(base.num_layers)})
    setting.write(tmp_path / "setting.json")
    return backbone, setting, tmp_path / "setting.json"


def test_vllm_names_are_full_and_packed_where_any_part_is_kept(mixed):
    _, setting, _ = mixed
    want = []
    for n in range(setting.num_layers):
        kept = PATTERN[n % 3]
        attn, mlp = f"model.layers.{n}.self_attn", f"model.layers.{n}.mlp"
        want += [f"{attn}.qkv_proj"] * bool({"Q", "K", "V"} & set(kept)) + [f"{attn}.o_proj"] * ("O" in kept)
        want += [f"{mlp}.gate_up_proj"] * bool({"G", "U"} & set(kept)) + [f"{mlp}.down_proj"] * ("D" in kept)
    assert sorted(vllm_target_modules(setting)) == sorted(want)
    assert vllm_target_modules(setting)[0].startswith("model.layers.0.")  # layer by layer


def test_the_peft_config_wraps_exactly_the_settings_modules(mixed):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    backbone, setting, _ = mixed
    options = {k: v for k, v in peft_config(setting, 4, 8).items() if k != "peft_type"}
    model = get_peft_model(backbone.model, LoraConfig(**options))
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(setting.modules)


def test_sglang_gets_the_kinds_and_a_warning_that_they_are_wider(mixed):
    _, setting, _ = mixed
    text, warnings = export(setting, "sglang", 4, 8)
    assert text.split()[1:] == sorted({m.rpartition(".")[2] for m in setting.modules})
    assert "every layer" in warnings[0] and f"the setting has {len(setting.modules)}" in warnings[0]


def test_the_cli_prints_or_writes_and_warns_of_partial_adapters(mixed, capsys, tmp_path):
    _, setting, path = mixed
    assert main(["export", "--setting", str(path), "--engine", "vllm"]) == 0
    out, err = capsys.readouterr()
    assert out.split()[0] == "--lora-target-modules" and out.split()[1:] == vllm_target_modules(setting)
    assert "served partly" in err
    assert (
        main(["export", "--setting", str(path), "--engine", "peft", "--r", "8", "--out", str(tmp_path / "c.json")]) == 0
    )
    config = json.loads((tmp_path / "c.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 24


def test_bad_export_input_is_one_line(mixed, capsys, tmp_path):
    _, _, path = mixed
    assert "--r must be" in fail(capsys, ["export", "--setting", str(path), "--engine", "peft", "--r", "0"])
    assert "nope.json" in fail(capsys, ["export", "--setting", str(tmp_path / "nope.json"), "--engine", "vllm"])
