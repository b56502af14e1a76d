"""Which (layer, projection) pairs a FanLoRA setting puts LoRA on, in vLLM's module names.

This module reads the setting and adapter files with the standard library only, because it runs inside vLLM's
own environment, where fanlora (and its transformers pin) is not installed. The setting's format is fanlora's
``fanlora-setting/1`` (``fanlora/setting.py`` writes it); only its ``modules`` list — the Hugging Face module
paths that carry LoRA, e.g. ``model.layers.3.self_attn.v_proj`` — matters here.

vLLM fuses projections: ``qkv_proj`` holds q/k/v and ``gate_up_proj`` holds gate/up (the model's
``packed_modules_mapping``). A packed projection is wrapped where at least one of its parts is in the setting
at that layer, and only those parts' LoRA slices are computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

FORMAT = "fanlora-setting/1"
MAX_JSON_BYTES = 8 << 20  # a setting or adapter_config.json is a few KB; refuse anything absurd
PEFT_PREFIX = "base_model.model."


class PlacementError(ValueError):
    """A setting or adapter that cannot be served as asked; the message names the problem and the fix."""


def _read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise PlacementError(f"{path} is over {MAX_JSON_BYTES >> 20} MB: not a setting or adapter config")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlacementError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PlacementError(f"{path} is not a JSON object")
    return data


class Placement:
    """The setting's modules, and how they map onto vLLM's (possibly packed) projections."""

    def __init__(self, modules: set[str], source: str):
        self.modules = frozenset(modules)
        self.source = source

    @classmethod
    def read(cls, path: str | Path) -> Placement:
        path = Path(path)
        data = _read_json(path)
        if data.get("format") != FORMAT:
            raise PlacementError(f"{path} is not a fanlora setting (format {data.get('format')!r}, want {FORMAT!r})")
        modules = data.get("modules")
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            raise PlacementError(f"{path} has no 'modules' list: write it with `fanlora select`")
        return cls(set(modules), str(path))

    @property
    def digest(self) -> str:
        """What the setting changes in the model graph — its modules, not its file path — as a short hash."""
        return hashlib.sha256("\n".join(sorted(self.modules)).encode()).hexdigest()[:16]

    def parts(self, name: str, packed: dict[str, list[str]]) -> list[str]:
        """The Hugging Face module names behind vLLM's module ``name`` (one, or a packed projection's parts)."""
        prefix, _, last = name.rpartition(".")
        return [f"{prefix}.{p}" if prefix else p for p in packed.get(last, [last])]

    def active_slices(self, name: str, packed: dict[str, list[str]]) -> tuple[bool, ...]:
        """Per part of vLLM's module ``name``: does the setting put LoRA on it?"""
        return tuple(p in self.modules for p in self.parts(name, packed))

    def wraps(self, name: str, packed: dict[str, list[str]]) -> bool:
        return any(self.active_slices(name, packed))

    def outside(self, adapter_modules: set[str]) -> list[str]:
        return sorted(adapter_modules - self.modules)


def adapter_modules(folder: str | Path) -> set[str]:
    """The module paths a PEFT adapter folder holds LoRA factors for (from the safetensors header alone)."""
    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise PlacementError(f"{folder} holds no adapter_model.safetensors: save the adapter with PEFT")
    try:
        with weights.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_JSON_BYTES:
                raise PlacementError(f"{weights}: safetensors header of {size} bytes is not an adapter's")
            header = json.loads(f.read(size).decode("utf-8"))
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlacementError(f"cannot read the safetensors header of {weights}: {exc}") from None
    modules = set()
    for key in header:
        if key == "__metadata__":
            continue
        name = key.removeprefix(PEFT_PREFIX)
        for tail in (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight"):
            if name.endswith(tail):
                modules.add(name.removesuffix(tail))
                break
        else:
            modules.add(name)  # not a LoRA factor (a saved embedding, a bias): outside any setting
    return modules


def lora_module_paths(argv: list[str]) -> list[str]:
    """The adapter folders named by ``--lora-modules`` on vLLM's command line (``name=path`` or JSON)."""
    paths, grabbing = [], False
    for arg in argv:
        if arg.startswith("--lora-modules="):
            arg, grabbing = arg.split("=", 1)[1], True
        elif arg == "--lora-modules":
            grabbing = True
            continue
        elif arg.startswith("-"):
            grabbing = False
        if not grabbing:
            continue
        if arg.lstrip().startswith("{"):
            try:
                path = json.loads(arg).get("path")
            except (json.JSONDecodeError, AttributeError):
                path = None
            if isinstance(path, str):
                paths.append(path)
        elif "=" in arg:
            paths.append(arg.split("=", 1)[1])
    return paths


def find_placement(environ: dict[str, str] | None = None, argv: list[str] | None = None) -> Placement | None:
    """The setting to honour: ``FANLORA_SETTING``, else the one setting.json the ``--lora-modules`` folders share.

    ``FANLORA_SETTING=off`` (or no setting anywhere) leaves vLLM as it is.
    """
    environ = os.environ if environ is None else environ
    chosen = environ.get("FANLORA_SETTING", "").strip()
    if chosen.lower() == "off":
        return None
    if chosen:
        return Placement.read(chosen)
    import sys

    found = [Path(p) / "setting.json" for p in lora_module_paths(sys.argv if argv is None else argv)]
    placements = [Placement.read(f) for f in found if f.is_file()]
    if not placements:
        return None
    if len({p.modules for p in placements}) > 1:
        names = ", ".join(p.source for p in placements)
        raise PlacementError(
            f"the --lora-modules adapters hold different settings ({names}): serve one backbone's setting, "
            "or name it with FANLORA_SETTING=path/to/setting.json"
        )
    return placements[0]
