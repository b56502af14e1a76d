"""What the searched methods (SSP, Learned-Adapter) share: a budget check and the two-phase build.

Their ``build`` returns a :class:`~fanlora.methods.registry.Built` that only searches; the grid calls its
``search`` with the task's data, which runs the method's search and returns the model to retrain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from fanlora.backbone import Backbone
from fanlora.errors import UserError
from fanlora.methods.registry import BuildContext, Built, Method


class SearchedMethod(Method):
    """A method that searches its structure on the task, then retrains what it kept."""

    searched = True
    budget_required: ClassVar[bool] = False  # SSP needs one; Learned-Adapter's DARTS rule decides without

    def search(self, backbone: Backbone, opts: dict[str, Any], train: Any, dev: Any, params: Any,
               where: Path, pad_id: int, train_adapter: Any) -> tuple[list[Any], float]:  # fmt: skip
        raise NotImplementedError

    def retrain_model(self, backbone: Backbone, chosen: list[Any], opts: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        raise NotImplementedError

    def build(self, backbone: Backbone, opts: dict[str, Any], ctx: BuildContext) -> Built:
        budget = opts["budget"]
        valid = isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1
        if not valid and (self.budget_required or budget is not None):
            raise UserError(
                f"{self.name} needs a parameter budget (integer ≥ 1), got {budget!r}: experiments set FanLoRA's"
            )

        def run_search(train: Any, dev: Any, params: Any, directory: Any, pad_id: int) -> Built:
            from fanlora.train import train_adapter

            where = Path(directory) / "search"
            chosen, minutes = self.search(backbone, opts, train, dev, params, where, pad_id, train_adapter)
            model = self.retrain_model(backbone, chosen, opts)
            return Built(
                model, self.name, self.trainable(model), custom_save=self.save, search_minutes=minutes,
                structure=[c.label for c in chosen],
            )  # fmt: skip

        return Built(backbone.model, self.name, 0, search=run_search)
