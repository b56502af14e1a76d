"""Gated LoRA: LoRA of rank r0 on every (kind, layer), each with an on/off gate (the paper's eq. 2).

PEFT builds and saves the LoRA modules; what it lacks is a per-module switch, which the AB-score needs
(switch one module off in M_all, or on in M_null). We use PEFT's own ``BaseTunerLayer.enable_adapters``: a
layer whose adapters are disabled runs only its base layer, so an *off* gate skips the LoRA computation
instead of multiplying it by zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from fanlora.backbone import ModuleLayout

Key = tuple[str, int]


class GatedLoRA:
    """A PEFT LoRA model plus one gate per (kind, layer)."""

    def __init__(self, peft_model: PeftModel, layout: ModuleLayout) -> None:
        self.model = peft_model
        self.layout = layout
        base = peft_model.get_base_model()
        self._layers: dict[Key, BaseTunerLayer] = {}
        for kind, layer in layout.all_modules():
            module = base.get_submodule(layout.module_name(kind, layer))
            if not isinstance(module, BaseTunerLayer):
                raise RuntimeError(f"{layout.module_name(kind, layer)} carries no LoRA module")
            self._layers[(kind, layer)] = module

    @classmethod
    def create(cls, model: nn.Module, layout: ModuleLayout, r: int, alpha: int, dropout: float) -> GatedLoRA:
        """Wrap ``model`` in place with fresh LoRA (A random, B zero) on every mapped module."""
        names = [layout.module_name(k, layer) for k, layer in layout.all_modules()]
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, task_type="CAUSAL_LM")
        return cls(get_peft_model(model, config), layout)

    @classmethod
    def load(cls, model: nn.Module, layout: ModuleLayout, adapter_dir: str | Path) -> GatedLoRA:
        """Load a stage-a adapter (plain PEFT format) onto ``model`` for scoring."""
        return cls(PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False), layout)

    @property
    def keys(self) -> list[Key]:
        return list(self._layers)

    def set(self, key: Key, on: bool) -> None:
        self._layers[key].enable_adapters(on)

    def is_on(self, key: Key) -> bool:
        return not self._layers[key].disable_adapters

    def set_all(self, on: bool) -> None:
        for layer in self._layers.values():
            layer.enable_adapters(on)

    def only(self, keys: Iterable[Key]) -> AbstractContextManager[None]:
        """M_null with just ``keys`` switched on; restores every gate afterwards."""
        return self._scoped(False, keys)

    def without(self, keys: Iterable[Key]) -> AbstractContextManager[None]:
        """M_all with ``keys`` switched off; restores every gate afterwards."""
        return self._scoped(True, keys)

    @contextmanager
    def _scoped(self, others: bool, keys: Iterable[Key]) -> Iterator[None]:
        saved = {k: self.is_on(k) for k in self._layers}
        try:
            self.set_all(others)
            for k in keys:
                self.set(k, not others)
            yield
        finally:
            self._restore(saved)

    def _restore(self, saved: dict[Key, bool]) -> None:
        for k, on in saved.items():
            if self.is_on(k) != on:
                self.set(k, on)
