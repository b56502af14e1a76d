"""``ia3``: PEFT's (IA)3 on K, V and the FFN's down projection (the (IA)3 paper's placement)."""

from __future__ import annotations

from typing import Any, ClassVar

from fanlora.backbone import Backbone
from fanlora.methods.common import module_names
from fanlora.methods.registry import BuildContext, Built, PeftMethod, register


class IA3(PeftMethod):
    name = "ia3"
    order = 3
    peft_type = "IA3"
    defaults: ClassVar[dict[str, Any]] = {"kinds": ["K", "V", "D"], "feedforward": ["D"]}

    def build(self, backbone: Backbone, opts: dict[str, Any], ctx: BuildContext) -> Built:
        from peft import IA3Config

        config = IA3Config(
            target_modules=module_names(backbone, opts["kinds"]),
            feedforward_modules=module_names(backbone, opts["feedforward"]),
            task_type="CAUSAL_LM",
        )
        return self.wrap(backbone, config)


register(IA3())
