"""The four places where the plugin changes vLLM's LoRA path (vLLM 0.32, the versions in ``SUPPORTED``).

vLLM wraps every supported projection of every layer with LoRA whatever the adapters target, and computes all
slices of a packed projection (``qkv_proj``, ``gate_up_proj``) even where an adapter has zeros; its
``--lora-target-modules`` filters by module *kind* across all layers. There is no per-layer hook, so the plugin
patches, in every vLLM process:

1. ``vllm.lora.model_manager.is_supported_lora_module`` and ``LoRAModelManager._match_target_modules`` — a
   module is wrapped only where the setting holds it (a packed one where one of its parts is);
2. ``LoRAModelManager._create_lora_modules`` — afterwards, each packed wrapper computes only its active slices
   (the punica wrapper's ``offset_start`` places a slice's expand; the fully sharded variants of
   ``--fully-sharded-loras`` and CUDA's dual-stream path keep every slice), and ``FANLORA_VLLM_REPORT`` (a path) gets
   the engine's own module tree: which modules are LoRA wrappers and their active slices;
3. ``WorkerLoRAManager._load_adapter`` — an adapter with factors outside the setting is refused with a
   ``ValueError`` instead of being served partly as the base (vLLM skips weights for unwrapped modules);
4. in the API server, ``OpenAIServingModels._check_load_lora_adapter_request`` — the same check before the
   engine sees the adapter, so ``/v1/load_lora_adapter`` answers 400 naming the modules (vLLM turns engine
   load errors into 500).
"""

from __future__ import annotations

import json
import os
import sys
import types
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


def refusal(placement: Placement, folder: str, outside: list[str]) -> str:
    shown = ", ".join(outside[:4]) + (f" and {len(outside) - 4} more" if len(outside) > 4 else "")
    return (
        f"adapter {folder} puts LoRA on {len(outside)} module(s) outside the FanLoRA setting {placement.source} "
        f"({shown}): train it on that setting (`fanlora finetune --setting ...`), or serve it without the plugin"
    )


def _lora_on_active_slices(self, x, output):
    """``BaseLinearLayerWithLoRA._apply_lora_to_output`` computing only the slices the setting uses."""
    from vllm.platforms import current_platform

    original_shape = output.shape if output.ndim == 3 else None
    if x.ndim == 3 and output.ndim == 3:
        output, x = output.flatten(0, 1), x.flatten(0, 1)
    offset = 0
    for i, size in enumerate(self.output_slices):
        if self.fanlora_active[i]:
            result = self.punica_wrapper.add_lora_linear(
                output, x, (self.lora_a_stacked[i],), (self.lora_b_stacked[i],), 1.0, (size,), offset_start=offset
            )
            if not current_platform.can_update_inplace():
                output = result
        offset += size
    return output.reshape(original_shape) if original_shape is not None else output


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
            for name, module in self.modules.items():
                active = placement.active_slices(name, packed)
                if len(active) > 1 and len(active) == len(getattr(module, "output_slices", ())):
                    module.fanlora_active = active
                    if not all(active) and "Sharded" not in type(module).__name__:
                        module._apply_lora_to_output = types.MethodType(_lora_on_active_slices, module)
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
        try:
            outside = placement.outside(adapter_modules(request.lora_path))
        except PlacementError as exc:
            message = str(exc)
        else:
            if not outside:
                return None
            message = refusal(placement, request.lora_path, outside)
        return serving.create_error_response(
            message=message, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST
        )

    models._check_load_lora_adapter_request = check
