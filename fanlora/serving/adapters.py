"""Read a PEFT LoRA directory into per-module (A, B·scaling) pairs, refusing what the engine cannot serve exactly.

The engine keeps adapters unmerged and computes ``x·Aᵀ·(s·B)ᵀ`` itself, so it needs the raw factors and the
scaling PEFT would apply (``lora_alpha / r``, or ``/ √r`` with rsLoRA, per-module overrides from
``rank_pattern``/``alpha_pattern``). Only plain LoRA on linear modules is accepted: DoRA, LoRA biases, dropout
at inference (a no-op anyway), ``modules_to_save`` and embeddings would change the arithmetic, so they are
refused with the reason. Weights come only from ``adapter_model.safetensors`` (never a pickle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fanlora.atomic import read_json
from fanlora.errors import UserError
from fanlora.serving.flags import DEFAULTS

PREFIX = "base_model.model."


@dataclass
class LoadedAdapter:
    path: Path
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name → (A [r, in], B·scaling [out, r])
    setting: dict | None  # the setting.json that travels with a fanlora adapter, if any


MAX_CONFIG_BYTES = 1_000_000  # an adapter_config.json is a few hundred bytes
DEFAULT_MAX_RANK = DEFAULTS["max_lora_rank"]


def _config(path: Path) -> dict:
    """adapter_config.json as a dict, or a UserError naming what is wrong with it."""
    file = path / "adapter_config.json"
    if not file.is_file():
        raise UserError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    config = read_json(file, "fix or replace the adapter (fanlora finetune writes it)", MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise UserError(f"{file} holds a JSON {type(config).__name__}, not an object")
    return config


def _number(config: dict, key: str, default: float, where: Path) -> float:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where}: {key} is {value!r}, not a finite number")
    return float(value)


def _tensors(path: Path, max_rank: int) -> dict[str, torch.Tensor]:
    """The weights, read only after the header's shapes passed: a rank over ``max_rank`` or a tensor that is
    not a matrix is refused before any of its bytes are allocated."""
    from safetensors import SafetensorError, safe_open

    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(f"{path} has no adapter_model.safetensors: only safetensors weights are loaded")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                shape = weights.get_slice(key).get_shape()
                if len(shape) != 2:
                    raise UserError(f"{path}: {key} is a {len(shape)}-D tensor, not a 2-D float matrix")
                rank = shape[0] if ".lora_A." in key else shape[1] if ".lora_B." in key else 0
                if rank > max_rank:
                    raise UserError(f"{path}: {key} has rank {rank}, over this server's --max-lora-rank {max_rank}")
            return {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{file} is not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


def _pairs(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                if not value.is_floating_point():  # the header check in _tensors made it 2-D
                    raise UserError(f"{path}: {key} is a {value.dim()}-D {value.dtype} tensor, not a 2-D float matrix")
                if not torch.isfinite(value).all():
                    raise UserError(f"{path}: {key} holds NaN or infinite values")
                pairs.setdefault(name.split(marker)[0], {})[part] = value.float()
                break
        else:
            raise UserError(f"{path}: unexpected tensor {key} (only lora_A/lora_B weights are served)")
    return pairs


def read_adapter(path: str | Path, max_rank: int = DEFAULT_MAX_RANK) -> LoadedAdapter:
    """The adapter at ``path``, checked completely (config, every tensor's dtype, shape and values, ranks)
    before anything of it reaches the engine: every fault is a UserError with the reason."""
    path = Path(path)
    config = _config(path)
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
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict):
        raise UserError(f"{path}: alpha_pattern is not a mapping of module names to numbers")
    factors = {}
    for module, ab in _pairs(path, _tensors(path, max_rank)).items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise UserError(f"{path}: module {module} lacks lora_A or lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        if r < 1 or b.shape[1] != r:
            raise UserError(f"{path}: {module} has lora_A of rank {r} and lora_B of rank {b.shape[1]}: they must agree")
        if r > max_rank:
            raise UserError(f"{path}: {module} has rank {r}, over this server's --max-lora-rank {max_rank}")
        alpha = _pattern(alpha_pattern, module, _number(config, "lora_alpha", r, path))
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise UserError(f"{path}: alpha_pattern gives {module} {alpha!r}, not a finite number")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        scaled = b * scale
        if not torch.isfinite(scaled).all():
            raise UserError(f"{path}: {module}'s lora_B times its scaling ({scale:g}) overflows")
        factors[module] = (a.contiguous(), scaled.contiguous())
    if not factors:
        raise UserError(f"{path} holds no LoRA weights")
    setting_file = path / "setting.json"
    setting = None
    if setting_file.is_file():
        setting = read_json(setting_file, "fix or replace the adapter's setting.json", MAX_CONFIG_BYTES)
        if not isinstance(setting, dict):
            raise UserError(f"{setting_file} holds a JSON {type(setting).__name__}, not a setting object")
    return LoadedAdapter(path, max(a.shape[0] for a, _ in factors.values()), factors, setting)


def _pattern(pattern: dict[str, float], module: str, default: float) -> float:
    """PEFT's per-module override: the first pattern key the module name ends with."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


class HostCache:
    """Parsed adapters kept in host memory (`fanlora serve --max-cpu-loras`, as vLLM's), least recently used
    out, so an adapter evicted from the engine's slots comes back without reading and checking its folder again.
    An entry is valid for the weights file it was read from (path, size, modification time): a folder rewritten
    on disk is read again. Used only from the engine's thread."""

    def __init__(self, size: int) -> None:
        self.size = max(0, size)
        self.items: dict[str, tuple[tuple, LoadedAdapter]] = {}

    @staticmethod
    def _stamp(path: Path) -> tuple:
        st = (Path(path) / "adapter_model.safetensors").stat()
        return str(path), st.st_size, st.st_mtime_ns

    def take(self, name: str, path: Path) -> LoadedAdapter | None:
        entry = self.items.pop(name, None)
        try:
            return entry[1] if entry is not None and entry[0] == self._stamp(path) else None
        except OSError:
            return None

    def keep(self, name: str, path: Path, adapter: LoadedAdapter) -> None:
        if not self.size:
            return
        self.items.pop(name, None)
        self.items[name] = (self._stamp(path), adapter)
        while len(self.items) > self.size:
            self.items.pop(next(iter(self.items)))
