"""The fanlora-vllm plugin's reading of settings, adapters and vLLM's command line (no vLLM needed)."""

from __future__ import annotations

import pytest
from fanlora_vllm.placement import (  # plugins/vllm is on pytest's pythonpath (pyproject.toml)
    Placement,
    PlacementError,
    adapter_modules,
    find_placement,
    lora_module_paths,
)
from helpers import make_adapter, setting_for

from fanlora.backbone import load_backbone

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.fixture
def adapter(tmp_path, tiny_llama):
    setting = setting_for(load_backbone(str(tiny_llama)), kinds=("V", "D"))
    return make_adapter(tmp_path / "a", tiny_llama, setting, 4, 8, 0), setting


def test_placement_maps_packed_projections_to_their_active_slices(adapter):
    folder, setting = adapter
    placement = Placement.read(folder / "setting.json")
    assert placement.modules == set(setting.modules)
    assert placement.active_slices("model.layers.0.self_attn.qkv_proj", PACKED) == (False, False, True)
    assert placement.wraps("model.layers.1.mlp.down_proj", PACKED)
    assert not placement.wraps("model.layers.0.mlp.gate_up_proj", PACKED)
    assert not placement.wraps("model.layers.0.self_attn.o_proj", PACKED) and not placement.wraps("lm_head", PACKED)


def test_adapter_modules_come_from_the_safetensors_header(adapter, tmp_path):
    folder, setting = adapter
    assert adapter_modules(folder) == set(setting.modules)
    assert Placement(set(setting.modules[:1]), "s").outside(adapter_modules(folder)) == sorted(setting.modules[1:])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlacementError, match="no adapter_model"):
        adapter_modules(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(PlacementError, match="header"):
        adapter_modules(tmp_path / "empty")


def test_lora_modules_are_read_from_every_form_of_the_flag():
    argv = ["x", "--model", "m", "--lora-modules", "a=/p/a", '{"name": "b", "path": "/p/b"}', "--port", "1"]
    assert lora_module_paths(argv) == ["/p/a", "/p/b"]
    assert lora_module_paths(["x", "--lora-modules=c=/p/c", "--enable-lora"]) == ["/p/c"]
    assert lora_module_paths(["x", "--enable-lora"]) == []


def test_find_placement_env_first_then_the_adapters_shared_setting(adapter, tmp_path, tiny_llama):
    folder, setting = adapter
    argv = ["x", "--lora-modules", f"a={folder}"]
    assert find_placement({}, argv).modules == set(setting.modules)
    assert find_placement({"FANLORA_SETTING": "off"}, argv) is None
    assert find_placement({}, ["x"]) is None
    other = make_adapter(tmp_path / "b", tiny_llama, setting_for(load_backbone(str(tiny_llama))), 4, 8, 1)
    with pytest.raises(PlacementError, match="different settings"):
        find_placement({}, [*argv, f"b={other}"])
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(PlacementError, match="not a fanlora setting"):
        find_placement({"FANLORA_SETTING": str(tmp_path / "bad.json")}, argv)


def test_other_vllm_versions_are_refused_with_the_way_out():
    from fanlora_vllm.patch import check_version

    check_version("0.32.0")
    check_version("0.32.3")
    with pytest.raises(RuntimeError, match="VLLM_PLUGINS="):
        check_version("0.33.0")
