"""The four places where the plugin changes vLLM's LoRA path (vLLM 0.32, the versions in ``SUPPORTED``).

vLLM wraps every supported projection of every layer with LoRA whatever the adapters target, and computes all
slices of a packed projection (``qkv_proj``, ``gate_up_proj``) even where an adapter has zeros; its
``--lora-target-modules`` filters by module *kind* across all layers. There is no per-layer hook, so the plugin
patches, in every vLLM process:

1. ``vllm.lora.model_manager.is_supported_lora_module`` and ``LoRAModelManager._match_target_modules`` — a
   module is wrapped only where the setting holds it (a packed one where one of its parts is);
2. ``LoRAModelManager._create_lora_modules`` — afterwards, each packed wrapper computes only its active slices,
   one punica call per contiguous run of them (K+V is one run: on GPU one Triton shrink/expand launch covers
   every slice it is given, so a call per slice would multiply launches at decode); the punica wrapper's
   ``offset_start`` places a run's expand. The wrapper's class is swapped for a cached subclass that overrides
   ``_apply_lora_to_output`` — no per-instance bound method and no import inside it, so ``torch.compile``
   (``fullgraph=True`` on CUDA) traces it like vLLM's own. The fully sharded variants of
   ``--fully-sharded-loras`` and CUDA's dual-stream path keep every slice. ``FANLORA_VLLM_REPORT`` (a path)
   gets the engine's own module tree: which modules are LoRA wrappers and their active slices;
3. ``InputProcessor._validate_lora`` (the frontend, offline ``LLM`` and API server alike) and, last,
   ``WorkerLoRAManager._load_adapter`` — an adapter with factors outside the setting is refused instead of being
   served partly as the base (vLLM skips weights for unwrapped modules); the frontend check raises for that
   request only, before the engine core would meet it inside a model step;
4. in the API server, ``OpenAIServingModels._check_load_lora_adapter_request`` — the same check before the
   engine sees the adapter, so ``/v1/load_lora_adapter`` answers 400 naming the modules (vLLM turns engine
   load errors into 500).

Two more keep the setting where vLLM would lose it: ``LoRAConfig.compute_hash`` takes the setting's digest, so
vLLM's compile cache (keyed by the config hash) never hands a graph traced under one placement to a server with
another or with none; and ``FANLORA_SETTING`` joins ``VLLM_RAY_EXTRA_ENV_VARS_TO_COPY``, because vLLM copies
only ``VLLM_``-prefixed variables to Ray workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from http import HTTPStatus
from pathlib import Path

from fanlora_vllm.placement import Placement, PlacementError, adapter_modules

SUPPORTED = ("0.32.",)


def check_version(version: str) -> None:
    if not version.startswith(SUPPORTED):
        raise RuntimeError(
            f"fanlora-vllm supports vLLM {', '.join(v + 'x' for v in SUPPORTED)}, this is vLLM {version}: "
            "install a supported vLLM, or unset the plugin with VLLM_PLUGINS= (vLLM then wraps every module)"
        )


def adapter_refusal(placement: Placement, folder: str) -> str | None:
    """Why the adapter in ``folder`` cannot be served on ``placement`` (``None``: it can)."""
    try:
        outside = placement.outside(adapter_modules(folder))
    except PlacementError as exc:
        return str(exc)
    return refusal(placement, folder, outside) if outside else None


def refusal(placement: Placement, folder: str, outside: list[str]) -> str:
    shown = ", ".join(outside[:4]) + (f" and {len(outside) - 4} more" if len(outside) > 4 else "")
    return (
        f"adapter {folder} puts LoRA on {len(outside)} module(s) outside the FanLoRA setting {placement.source} "
        f"({shown}): train it on that setting (`fanlora finetune --setting ...`), or serve it without the plugin"
    )


def active_runs(active: tuple[bool, ...], sizes: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """``(first, stop, offset)`` of each maximal run of consecutive active slices; ``offset`` is where the run's
    output starts. K+V of q/k/v is one run, Q+V two."""
    runs, offset, first = [], 0, None
    for i, (on, size) in enumerate(zip(active, sizes, strict=True)):
        if on and first is None:
            first, start = i, offset
        if not on and first is not None:
            runs.append((first, i, start))
            first = None
        offset += size
    if first is not None:
        runs.append((first, len(active), start))
    return tuple(runs)


def _lora_on_active_slices(self, x, output):
    """``BaseLinearLayerWithLoRA._apply_lora_to_output`` computing only the runs of slices the setting uses."""
    original_shape = output.shape if output.ndim == 3 else None
    if x.ndim == 3 and output.ndim == 3:
        output, x = output.flatten(0, 1), x.flatten(0, 1)
    for first, stop, offset in self.fanlora_runs:
        result = self.punica_wrapper.add_lora_linear(
            output,
            x,
            tuple(self.lora_a_stacked[first:stop]),
            tuple(self.lora_b_stacked[first:stop]),
            1.0,
            tuple(self.output_slices[first:stop]),
            offset_start=offset,
        )
        if not self.fanlora_inplace:
            output = result
    return output.reshape(original_shape) if original_shape is not None else output


_SKIPPING: dict[type, type] = {}


def skip_inactive_slices(module, active: tuple[bool, ...], inplace: bool) -> None:
    """Make a packed LoRA wrapper compute only its active slices: a cached subclass of its class (one per
    class, so every wrapper of a kind shares it) overrides ``_apply_lora_to_output``."""
    cls = type(module)
    if cls not in _SKIPPING:
        _SKIPPING[cls] = type(cls.__name__, (cls,), {"_apply_lora_to_output": _lora_on_active_slices,
                                                     "__module__": __name__})  # fmt: skip
    module.fanlora_runs = active_runs(active, tuple(module.output_slices))
    module.fanlora_inplace = inplace
    module.__class__ = _SKIPPING[cls]


def _tree(model, packed: dict[str, list[str]], placement: Placement | None) -> dict:
    from vllm.lora.layers import BaseLayerWithLoRA

    wrapped = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseLayerWithLoRA):
            active = getattr(module, "fanlora_active", None)
            wrapped[name] = list(active) if active is not None else [True] * getattr(module, "n_slices", 1)
    return {"setting": placement.source if placement else None, "wrapped": wrapped}


def patch_manager(placement: Placement | None) -> None:
    from vllm.lora import model_manager, worker_manager
    from vllm.platforms import current_platform

    manager = model_manager.LoRAModelManager
    if getattr(manager, "fanlora_patched", False):
        return
    manager.fanlora_patched = True
    original_create = manager._create_lora_modules

    def create(self):
        if placement is None:
            original_create(self)
        else:
            supported, match = model_manager.is_supported_lora_module, manager._match_target_modules
            packed = self.packed_modules_mapping
            model_manager.is_supported_lora_module = lambda n, m, s: supported(n, m, s) and placement.wraps(n, packed)
            manager._match_target_modules = lambda mgr, n: match(mgr, n) and placement.wraps(n, packed)
            try:
                original_create(self)
            finally:
                model_manager.is_supported_lora_module, manager._match_target_modules = supported, match
            inplace = current_platform.can_update_inplace()
            for name, module in self.modules.items():
                active = placement.active_slices(name, packed)
                if len(active) > 1 and len(active) == len(getattr(module, "output_slices", ())):
                    module.fanlora_active = active
                    if not all(active) and "Sharded" not in type(module).__name__:
                        skip_inactive_slices(module, active, inplace)
        report = os.environ.get("FANLORA_VLLM_REPORT")
        if report:
            Path(report).write_text(json.dumps(_tree(self.model, self.packed_modules_mapping, placement), indent=1))

    manager._create_lora_modules = create
    if placement is None:
        return
    original_load = worker_manager.WorkerLoRAManager._load_adapter

    def load(self, lora_request):
        lora = original_load(self, lora_request)
        outside = placement.outside(set(lora.loras))
        if outside:
            raise ValueError(refusal(placement, lora_request.lora_path, outside))
        return lora

    worker_manager.WorkerLoRAManager._load_adapter = load


def patch_input_processor(placement: Placement) -> None:
    """Refuse an adapter outside the setting in the frontend, where vLLM validates a request's LoRA — before the
    engine core, whose load error inside a model step would take the engine down — so the offline ``LLM``
    API raises for that request only and keeps serving."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine import input_processor

    processor = input_processor.InputProcessor
    if getattr(processor, "fanlora_patched", False):
        return
    processor.fanlora_patched = True
    original = processor._validate_lora
    checked: dict[tuple[str, float], str | None] = {}  # (folder, mtime) → refusal, read once per adapter version

    def validate(self, lora_request):
        original(self, lora_request)
        if lora_request is None:
            return
        folder = lora_request.lora_path
        key = (folder, os.stat(folder).st_mtime if os.path.exists(folder) else 0.0)
        if key not in checked:
            checked[key] = adapter_refusal(placement, folder)
        if checked[key] is not None:
            raise VLLMValidationError(checked[key])

    processor._validate_lora = validate


def patch_api_server(placement: Placement) -> None:
    """Refuse an adapter outside the setting at ``/v1/load_lora_adapter`` (and ``--lora-modules``) with a 400."""
    serving = sys.modules.get("vllm.entrypoints.openai.models.serving")
    if serving is None:
        return  # an engine or worker process: the API server imports this module before it loads plugins

    models = serving.OpenAIServingModels
    if getattr(models, "fanlora_patched", False):
        return
    models.fanlora_patched = True
    original = models._check_load_lora_adapter_request

    async def check(self, request):
        error = await original(self, request)
        if error is not None:
            return error
        message = adapter_refusal(placement, request.lora_path)
        if message is None:
            return None
        return serving.create_error_response(
            message=message, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST
        )

    models._check_load_lora_adapter_request = check


def patch_config_hash(placement: Placement) -> None:
    """The setting's digest in ``LoRAConfig.compute_hash``, which vLLM's compile-cache key includes."""
    from vllm.config.lora import LoRAConfig

    if getattr(LoRAConfig, "fanlora_digest", None) == placement.digest:
        return
    original = getattr(LoRAConfig, "fanlora_original_hash", LoRAConfig.compute_hash)

    def compute_hash(self) -> str:
        base = original(self)
        return hashlib.sha256(f"{base}/fanlora:{placement.digest}".encode()).hexdigest()[: len(base)]

    LoRAConfig.fanlora_original_hash = original
    LoRAConfig.fanlora_digest = placement.digest
    LoRAConfig.compute_hash = compute_hash


def carry_to_ray(environ: dict[str, str]) -> None:
    """Ask vLLM to copy ``FANLORA_SETTING`` to Ray workers (it copies ``VLLM_*`` and the names listed here)."""
    names = [n for n in environ.get("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", "").split(",") if n]
    if "FANLORA_SETTING" not in names:
        environ["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"] = ",".join([*names, "FANLORA_SETTING"])
