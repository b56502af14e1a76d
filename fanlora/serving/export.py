"""A setting in the words of engines that do not run fanlora: ``fanlora export --engine vllm|sglang|peft``.

- **vLLM** (0.32) matches ``--lora-target-modules`` against a module's suffix *or its full name*
  (``vllm/lora/utils.py``, ``is_in_target_modules``), so a list of full names places LoRA per layer on stock
  vLLM — at packed granularity: vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``, so a
  packed projection is listed where any of its parts is in the setting, and vLLM then computes every slice of
  it (the fanlora-vllm plugin computes only the active ones). An adapter with factors outside the list is
  *silently partial* on stock vLLM: it skips the weights of modules it did not wrap and serves the rest (the
  plugin refuses such an adapter).
- **SGLang** checks ``--lora-target-modules`` against module *kinds* (``q_proj`` … ``down_proj``, ``all``), as
  read in its ``server_args.py``; no per-layer name is accepted, so the export is the kinds the setting uses,
  in every layer — wider than the setting, and said so.
- **PEFT**: a ``LoraConfig`` whose ``target_modules`` is a regular expression PEFT matches against each
  module's full name (``re.fullmatch``), so ``get_peft_model`` wraps exactly the setting's modules.

Reads the setting only (no torch, no PEFT at import), like every serving path that reads one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from fanlora import atomic
from fanlora.errors import UserError
from fanlora.setting import Setting

ENGINES = ("vllm", "sglang", "peft")  # `fanlora export --engine`
#: vLLM's and SGLang's packed projections for Llama-family models (``packed_modules_mapping``), by part.
PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}  # fmt: skip
PARTIAL = (
    "an adapter with LoRA factors outside this list is served partly — vLLM skips the weights of modules it did "
    "not wrap, without an error; the fanlora-vllm plugin refuses such an adapter instead"
)


def _packed(module: str) -> str:
    prefix, _, last = module.rpartition(".")
    return f"{prefix}.{PACKED.get(last, last)}"


def _layer_of(module: str) -> tuple[int, str]:
    found = re.search(r"\.(\d+)\.", module)
    return (int(found.group(1)) if found else -1, module)


def vllm_target_modules(setting: Setting) -> list[str]:
    """Full vLLM module names, layer by layer: a packed projection where any of its parts is in the setting."""
    return sorted({_packed(m) for m in setting.modules}, key=_layer_of)


def sglang_target_modules(setting: Setting) -> list[str]:
    """The module kinds the setting uses (SGLang takes kinds only, in every layer)."""
    return sorted({m.rpartition(".")[2] for m in setting.modules})


def peft_config(setting: Setting, r: int, alpha: float) -> dict[str, Any]:
    """``LoraConfig`` keyword arguments that wrap exactly the setting's modules."""
    pattern = "|".join(re.escape(m) for m in sorted(setting.modules, key=_layer_of))
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
            "target_modules": f"(?:{pattern})"}  # fmt: skip


def export(setting: Setting, engine: str, r: int, alpha: float) -> tuple[str, list[str]]:
    """(what to give the engine, warnings for the user)."""
    if engine == "vllm":
        return "--lora-target-modules " + " ".join(vllm_target_modules(setting)), [PARTIAL]
    if engine == "sglang":
        kinds = sglang_target_modules(setting)
        wider = (
            f"SGLang takes module kinds, not layers: LoRA goes on {', '.join(kinds)} in every layer "
            f"({len(kinds) * setting.num_layers} modules, the setting has {len(setting.modules)}); for per-layer "
            "placement serve with vLLM (`--engine vllm`) or `fanlora serve`"
        )
        return "--lora-target-modules " + " ".join(kinds), [wider]
    return json.dumps(peft_config(setting, r, alpha), indent=2), []


def command(args: argparse.Namespace) -> int:
    """``fanlora export``: print (or ``--out``) what ``--engine`` needs; warnings go to stderr."""
    if args.r < 1 or args.alpha <= 0:
        raise UserError("--r must be ≥ 1 and --alpha > 0")
    text, warnings = export(Setting.read(args.setting), args.engine, args.r, args.alpha)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.out:
        atomic.write_text(args.out, text + "\n")
        print(f"{args.engine}: {args.out}")
    else:
        print(text)
    return 0
