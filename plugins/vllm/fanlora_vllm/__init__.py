"""fanlora-vllm: vLLM serves FanLoRA adapters with LoRA only where the setting puts it.

Registered as a ``vllm.general_plugins`` entry point, so vLLM calls :func:`register` in each of its processes
(API server, engine core, workers). It reads the setting (``FANLORA_SETTING=path/to/setting.json``, or the
setting.json the ``--lora-modules`` adapter folders share) and patches vLLM's LoRA manager; with no setting
(or ``FANLORA_SETTING=off``) vLLM runs as it is. Standard library and vLLM only: it installs into vLLM's own
environment without fanlora's stack.
"""

from __future__ import annotations

import logging

__all__ = ["register"]

log = logging.getLogger("fanlora_vllm")


def register() -> None:
    import os

    import vllm

    from fanlora_vllm.patch import (
        carry_to_ray,
        check_version,
        patch_api_server,
        patch_config_hash,
        patch_input_processor,
        patch_manager,
    )
    from fanlora_vllm.placement import find_placement

    check_version(vllm.__version__)
    placement = find_placement()
    patch_manager(placement)
    if placement is None:
        log.info("fanlora-vllm: no FanLoRA setting given: vLLM wraps its modules as usual")
        return
    os.environ["FANLORA_SETTING"] = placement.source  # engine and worker processes read the same one
    carry_to_ray(os.environ)  # Ray workers get only what vLLM is asked to copy
    patch_config_hash(placement)  # a compiled graph of another placement is never reused
    patch_input_processor(placement)
    patch_api_server(placement)
    log.info("fanlora-vllm: LoRA only on the %d modules of %s", len(placement.modules), placement.source)
