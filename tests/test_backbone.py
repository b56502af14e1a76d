from __future__ import annotations

import pytest
from tiny import make_tiny

from fanlora.backbone import KINDS, load_backbone, parse_module_map
from fanlora.errors import UserError

OPT_MAP = "Q=self_attn.q_proj,K=self_attn.k_proj,V=self_attn.v_proj,O=self_attn.out_proj,U=fc1,D=fc2"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])
def test_discovers_seven_kinds(tmp_path, arch):
    b = load_backbone(str(make_tiny(tmp_path / arch, arch)))
    assert b.layout.kinds == list(KINDS)
    assert b.layout.layers_path == "model.layers"
    assert b.layout.module_name("G", 1) == "model.layers.1.mlp.gate_proj"
    names = {n for n, _ in b.model.named_modules()}
    assert all(b.layout.module_name(k, layer) in names for k, layer in b.layout.all_modules())
    assert b.identity["model_type"] == arch and b.identity["num_layers"] == 2


def test_unfitting_architecture_lists_linears_and_accepts_a_map(tmp_path):
    path = make_tiny(tmp_path / "opt", "opt")
    with pytest.raises(UserError) as err:
        load_backbone(str(path))
    msg = str(err.value)
    assert "fc1" in msg and "out_proj" in msg and "--module-map" in msg
    b = load_backbone(str(path), module_map=OPT_MAP)
    assert b.layout.kinds == ["Q", "K", "V", "O", "U", "D"]
    assert b.layout.module_name("D", 0) == "model.decoder.layers.0.fc2"


def test_module_map_rejects_unknown_kind_and_missing_module(tmp_path, tiny_llama):
    with pytest.raises(UserError, match="unknown module kind 'X'"):
        parse_module_map("X=self_attn.q_proj")
    with pytest.raises(UserError, match=r"no linear module 'mlp\.nope'"):
        load_backbone(str(tiny_llama), module_map="Q=self_attn.q_proj,D=mlp.nope")


def test_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_backbone(str(tmp_path / "no-such-dir"))
    with pytest.raises(UserError, match="GGUF file"):
        load_backbone(str(tmp_path / "model.gguf"))


def test_weights_digest_ignores_dtype_but_not_weights(tiny_llama, tiny_llama_other):
    a = load_backbone(str(tiny_llama)).identity["weights_digest"]
    assert load_backbone(str(tiny_llama), dtype="bfloat16").identity["weights_digest"] == a
    assert load_backbone(str(tiny_llama_other)).identity["weights_digest"] != a


def test_layout_refuses_out_of_range(tiny_llama):
    layout = load_backbone(str(tiny_llama)).layout
    with pytest.raises(UserError, match="out of range"):
        layout.module_name("Q", 2)
    with pytest.raises(UserError, match="unknown module kind"):
        layout.module_name("Z", 0)
