"""bf16 autocast only where the hardware computes bf16: emulated bf16 made an AVX2 CPU ~24x slower."""

from __future__ import annotations

from fanlora import train
from fanlora.config import TrainParams


def test_bf16_is_used_only_on_hardware_that_has_it(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(train, "_WARNED", False)
    monkeypatch.setattr(train, "native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="fanlora.train"):
        args = train._arguments(TrainParams(bf16=True, max_steps=2), tmp_path, 8, 1)
    assert args.bf16 is False and "no native bf16" in caplog.text
    monkeypatch.setattr(train, "native_bf16", lambda: True)
    assert train._arguments(TrainParams(bf16=True, max_steps=2), tmp_path, 8, 1).bf16 is True
    assert train._arguments(TrainParams(bf16=False, max_steps=2), tmp_path, 8, 1).bf16 is False
