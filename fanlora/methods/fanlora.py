"""``fanlora``: LoRA (rank r1) on exactly the setting's modules — stage d."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from fanlora.backbone import Backbone
from fanlora.config import R1
from fanlora.errors import UserError
from fanlora.methods.registry import BuildContext, Built, PeftMethod, register
from fanlora.setting import Setting

RANK = R1  # stage d's rank (config.R1) and alpha = 2·r1
ALPHA = 2 * RANK


class FanLoRA(PeftMethod):
    name = "fanlora"
    order = 0
    peft_type = "LORA"
    needs_setting = True
    defaults: ClassVar[dict[str, Any]] = {"r": RANK, "alpha": ALPHA}

    def owns(self, directory: Path) -> bool:  # a LoRA adapter that carries the setting it was trained on
        return super().owns(directory) and (directory / "setting.json").is_file()

    def build(self, backbone: Backbone, opts: dict[str, Any], ctx: BuildContext) -> Built:
        if ctx.setting is None:
            raise UserError("method fanlora needs a setting (setting.json from `fanlora select`)")
        ctx.setting.validate(backbone)
        return self.wrap(backbone, ctx.setting.lora_config(opts["r"], opts["alpha"], ctx.dropout))

    def load(self, backbone: Backbone, directory: Path) -> nn.Module:
        Setting.read(directory / "setting.json").validate(backbone)
        return super().load(backbone, directory)


register(FanLoRA())
