"""The fine-tuning methods compared in the paper's Table 1, one file each, all built for ``train.py``.

- ``fanlora``: LoRA (rank r1) on exactly the setting's modules (stage d).
- ``lora``: LoRA on every linear module of every layer; rank 4 as the paper's baseline.
- ``adalora``: PEFT's AdaLoRA on every module, initial rank 8, target average rank 4.
- ``ia3``: PEFT's (IA)3 on K, V and the FFN's down projection.
- ``houlsby``: bottleneck adapters of size 18 after attention and after the FFN.
- ``ssp``: sparse structure search, under FanLoRA's parameter budget, then the chosen structure retrained.
- ``learned-adapter``: where bottleneck-36 adapters connect and with which activation, searched by gradient.

:mod:`fanlora.methods.registry` holds the protocol; every module of this package is imported here, so a new
method is one new file that calls ``register`` (see docs/extending.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from fanlora.methods.common import lora_params, lora_rank_for_budget, module_names, randomize
from fanlora.methods.registry import (
    BuildContext,
    Built,
    Method,
    PeftMethod,
    build,
    check_options,
    get,
    load,
    names,
    owner,
    register,
    unregister,
)

__all__ = [
    "BuildContext", "Built", "Method", "PeftMethod", "build", "check_options", "get", "load", "lora_params",
    "lora_rank_for_budget", "module_names", "names", "owner", "randomize", "register", "unregister",
]  # fmt: skip

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
