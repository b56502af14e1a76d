"""``lora``: LoRA on every linear module of every layer; rank 4 as the paper's baseline."""

from __future__ import annotations

from typing import Any, ClassVar

from fanlora.backbone import Backbone
from fanlora.methods.common import module_names
from fanlora.methods.registry import BuildContext, Built, PeftMethod, register


class LoRA(PeftMethod):
    name = "lora"
    order = 1
    peft_type = "LORA"
    defaults: ClassVar[dict[str, Any]] = {"r": 4, "alpha": 8}

    def build(self, backbone: Backbone, opts: dict[str, Any], ctx: BuildContext) -> Built:
        from peft import LoraConfig

        config = LoraConfig(
            r=opts["r"],
            lora_alpha=opts["alpha"],
            lora_dropout=ctx.dropout,
            target_modules=module_names(backbone),
            task_type="CAUSAL_LM",
        )
        return self.wrap(backbone, config)


register(LoRA())
