"""Read a PEFT LoRA directory into per-module (A, B·scaling) pairs, refusing what the engine cannot serve exactly.

The engine keeps adapters unmerged and computes ``x·Aᵀ·(s·B)ᵀ`` itself, so it needs the raw factors and the
scaling PEFT would apply (``lora_alpha / r``, or ``/ √r`` with rsLoRA, per-module overrides from
``rank_pattern``/``alpha_pattern``). Only plain LoRA on linear modules is accepted: DoRA, LoRA biases, dropout
at inference (a no-op anyway), ``modules_to_save`` and embeddings would change the arithmetic, so they are
refused with the reason. Weights come only from ``adapter_model.safetensors`` (never a pickle).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fanlora.errors import UserError

PREFIX = "base_model.model."


@dataclass
class LoadedAdapter:
    path: Path
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name → (A [r, in], B·scaling [out, r])
    setting: dict | None  # the setting.json that travels with a fanlora adapter, if any


def read_adapter(path: str | Path) -> LoadedAdapter:
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise UserError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    if not weights_file.is_file():
        raise UserError(f"{path} has no adapter_model.safetensors: only safetensors weights are loaded")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file} is not valid JSON ({exc.msg})") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path} is a {config.get('peft_type')} adapter: the engine serves LoRA adapters only")
    for key, why in (
        ("use_dora", "DoRA rescales the weight"),
        ("lora_bias", "LoRA biases add a term"),
        ("modules_to_save", "it replaces whole modules"),
        ("trainable_token_indices", "it changes embeddings"),
    ):
        if config.get(key):
            raise UserError(f"{path} uses {key} ({why}), which the engine does not serve")
    from safetensors.torch import load_file

    tensors = load_file(str(weights_file), device="cpu")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                module = name.split(marker)[0]
                pairs.setdefault(module, {})[part] = value.float()
                break
        else:
            raise UserError(f"{path}: unexpected tensor {key} (only lora_A/lora_B weights are served)")
    factors = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise UserError(f"{path}: module {module} lacks lora_A or lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[module] = (a.contiguous(), (b * scale).contiguous())
    if not factors:
        raise UserError(f"{path} holds no LoRA weights")
    setting_file = path / "setting.json"
    setting = json.loads(setting_file.read_text()) if setting_file.is_file() else None
    return LoadedAdapter(path, max(a.shape[0] for a, _ in factors.values()), factors, setting)


def _pattern(pattern: dict[str, float], module: str, default: float) -> float:
    """PEFT's per-module override: the first pattern key the module name ends with."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default
