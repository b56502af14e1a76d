"""``adalora``: PEFT's AdaLoRA on every module, initial rank 8, target average rank 4 (half the budget pruned).

``update_and_allocate`` is called after every optimizer step, while the gradients are still there (a Trainer
callback on ``on_optimizer_step``: at ``on_step_end`` they are already zeroed).
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import TrainerCallback

from fanlora.backbone import Backbone
from fanlora.errors import UserError
from fanlora.methods.common import module_names
from fanlora.methods.registry import BuildContext, Built, PeftMethod, register


class AdaLoraStep(TrainerCallback):
    """Budget reallocation after each optimizer step, with the step's gradients still in place."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model.base_model.update_and_allocate(state.global_step)


class AdaLoRA(PeftMethod):
    name = "adalora"
    order = 2
    peft_type = "ADALORA"
    defaults: ClassVar[dict[str, Any]] = {
        "init_r": 8,
        "target_r": 4,
        "alpha": 8,
        "tinit_ratio": 0.1,
        "tfinal_ratio": 0.2,
        "delta_t": 1,
    }

    def build(self, backbone: Backbone, opts: dict[str, Any], ctx: BuildContext) -> Built:
        from peft import AdaLoraConfig

        steps = ctx.total_steps
        if steps < 1:
            raise UserError("adalora needs the number of training steps (its budget schedule is by step)")
        tinit = int(opts["tinit_ratio"] * steps)
        tfinal = int(opts["tfinal_ratio"] * steps)
        if tinit + tfinal >= steps:
            raise UserError(f"adalora: tinit_ratio + tfinal_ratio must leave steps to prune in ({steps} steps in all)")
        config = AdaLoraConfig(
            init_r=opts["init_r"],
            target_r=opts["target_r"],
            lora_alpha=opts["alpha"],
            lora_dropout=ctx.dropout,
            target_modules=module_names(backbone),
            total_step=steps,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=opts["delta_t"],
            task_type="CAUSAL_LM",
        )
        return self.wrap(backbone, config, callbacks=[AdaLoraStep()])


register(AdaLoRA())
