"""Shape-only backbones: a public architecture's config with random weights, for timing and load tests.

Decode speed and memory do not depend on weight values, so ``--backbone shape:llama-2-7b`` answers "what would
this setting cost on a 7B deployment, on this GPU?" without the 13 GB checkpoint, offline, and within the 64 MiB
a lent GPU takes per call. ``shape:NAME`` reads a bundled config (``fanlora/backbone/configs/NAME.json``: the
architecture fields of the public model's ``config.json``), ``shape:PATH`` any ``config.json``.

The model is built directly on the target device in the target dtype (torch's device context: parameters are
allocated and initialised there — a 7B model never exists as 28 GB of float32 on the host), from a fixed seed,
so two builds on one device hold the same weights. transformers' ``from_config`` already does the building; what
it lacks is a name for the shape, the dtype/device placement in one step, and an identity that says the weights
are random so that no setting, score or adapter made on it can pass for a real model's
(:func:`fanlora.backbone.load_backbone` refuses shapes to every command that trains or scores).

The tokenizer is the embedded backbone's (no network), or a saved copy of it named by ``$FANLORA_TOKENIZER``
on a machine without the embedded package (`scripts/gpu-prepare.sh` makes one for a lent GPU). Where its
vocabulary is larger than the config's (Llama-2: 32000 < 49152), the model's vocabulary is raised to fit it —
every token the tokenizer makes must be embeddable — and the identity records both sizes
(``config_vocab_size``), so a report can say so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fanlora.errors import UserError

PREFIX = "shape:"
CONFIGS = Path(__file__).parent / "configs"
#: the marker every artifact's identity carries when its weights are random
RANDOM = "random"


def is_shape(name: str | None) -> bool:
    return bool(name) and str(name).startswith(PREFIX)


def bundled() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def read_config(name: str) -> tuple[str, dict[str, Any]]:
    """(display name, config dict) of ``shape:NAME`` or ``shape:PATH``; one line naming the fix otherwise."""
    spec = name[len(PREFIX) :]
    path = CONFIGS / f"{spec}.json" if (CONFIGS / f"{spec}.json").is_file() else Path(spec).expanduser()
    if not spec or not path.is_file():
        raise UserError(
            f"unknown shape {spec!r}: use one of {', '.join(bundled())} or the path of a config.json (shape:PATH)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = type(exc).__name__
        raise UserError(f"{path} is not a readable JSON config ({why}): give a model's config.json") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{path} has no model_type: give a transformers config.json")
    return path.stem if path.parent == CONFIGS else str(path), data


def build(name: str, dtype: torch.dtype, device: torch.device, tokenizer: Any, seed: int = 0) -> tuple[Any, dict]:
    """(model with random weights on ``device`` in ``dtype``, identity fields) for ``shape:…``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    display, data = read_config(name)
    fields = {k: v for k, v in data.items() if not k.startswith("_")}
    config_vocab = int(fields.get("vocab_size", 0))
    fields["vocab_size"] = max(config_vocab, len(tokenizer))
    try:
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (ValueError, KeyError) as exc:
        raise UserError(f"shape {display}: transformers cannot build this config ({exc})") from None
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = f"{PREFIX}{display}"
    identity = {
        "name": f"{PREFIX}{display} (random weights)",
        "weights": RANDOM,
        "shape_of": data.get("_shape_of", display),
        "config_vocab_size": config_vocab,
    }
    return model, identity
