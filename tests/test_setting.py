from __future__ import annotations

import json

import pytest
from helpers import table_for
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from fanlora.backbone import KINDS, load_backbone
from fanlora.errors import UserError
from fanlora.setting import Setting
from fanlora.stages.selection import select


@pytest.fixture(scope="module")
def backbone(tiny_llama):
    return load_backbone(str(tiny_llama))


def test_top_k_and_never_negative(backbone):
    t = table_for(backbone, {("V", 0): 0.3, ("O", 0): 0.2, ("Q", 0): 0.1, ("D", 1): 0.05})
    s = select(t, 2)
    assert s.kept == {0: ["V", "O"], 1: ["D"]}  # layer 1 keeps 1: every other score is negative
    assert s.modules == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert select(t, 1).kept == {0: ["V"], 1: ["D"]}
    assert select(t, 7).n_modules == 4


def test_ties_follow_kind_order_and_zero_is_kept(backbone):
    s = select(table_for(backbone, {("U", 0): 0.0, ("K", 0): 0.0, ("G", 1): 1.0}), 2)
    assert s.kept[0] == ["K", "U"]


@pytest.mark.parametrize("k", [0, -1])
def test_bad_k_max(backbone, k):
    with pytest.raises(UserError, match="k_max must be an integer >= 1"):
        select(table_for(backbone, {("Q", 0): 1.0}), k)


def test_all_negative_is_refused(backbone):
    with pytest.raises(UserError, match="every score is negative"):
        select(table_for(backbone, {}), 2)


def test_json_round_trip_and_validation(backbone, tiny_llama_other, tiny_llama_3layers, tmp_path):
    s = select(table_for(backbone, {("V", 0): 1.0, ("G", 1): 0.5}), 2, {"scores": "x"})
    s.write(tmp_path / "setting.json")
    back = Setting.read(tmp_path / "setting.json")
    assert back.to_dict() == s.to_dict()
    back.validate(backbone)
    with pytest.raises(UserError, match="weights_digest"):
        back.validate(load_backbone(str(tiny_llama_other)))
    with pytest.raises(UserError, match="for 2 layers but"):
        back.validate(load_backbone(str(tiny_llama_3layers)))


def test_unknown_kind_in_setting_file(backbone, tmp_path):
    data = select(table_for(backbone, {("V", 0): 1.0}), 2).to_dict()
    data["kept"]["1"] = ["X"]
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="unknown module kind 'X'"):
        Setting.read(tmp_path / "s.json")


def test_lora_config_wraps_exactly_the_setting_and_round_trips(tiny_llama, tmp_path):
    b = load_backbone(str(tiny_llama))
    s = select(table_for(b, {("V", 0): 1.0, ("O", 0): 0.5, ("U", 1): 0.2}), 2)
    model = get_peft_model(b.model, s.lora_config(r=4, alpha=8))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == sorted(s.modules)
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(load_backbone(str(tiny_llama)).model, str(tmp_path / "adapter"))
    assert sorted(
        n.removeprefix("base_model.model.") for n, m in again.named_modules() if isinstance(m, LoraLayer)
    ) == sorted(s.modules)
    assert len(KINDS) * 2 > len(wrapped)


def test_reading_a_setting_needs_neither_peft_nor_the_scores():
    """The server reads settings: before, importing fanlora.setting loaded PEFT and the scoring package."""
    import subprocess
    import sys

    code = (
        "import sys, fanlora.setting; "
        "print('peft' in sys.modules, any(m.startswith('fanlora.scoring') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
