"""The method registry: one :class:`Method` object per fine-tuning method, each defined in its own file.

A method says, in one place, everything the rest of fanlora asks of it — its defaults, how it wraps a
backbone for ``train.train_adapter``, how what it trained is saved, recognised, loaded back and counted, and
how an element of a searched structure reads in a report. ``build``, stage d (:mod:`fanlora.stages.finetune`),
the evaluation loader, the grid, its report and the benchmarks go through :func:`get` and never test a method's
name.

Adding a method is one file that subclasses :class:`Method` (or :class:`PeftMethod` for a PEFT tuner) and
calls :func:`register` at import; files in ``fanlora/methods/`` are imported by the package, and a method
defined elsewhere (a plugin, a test) registers the same way. Modelled on PEFT's ``register_peft_method``:
the name is the key, a second registration of a name is refused unless ``replace=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from fanlora.backbone import Backbone
from fanlora.errors import UserError
from fanlora.registry import Registry
from fanlora.setting import Setting


@dataclass
class Built:
    """A model ready for ``train_adapter``, its callbacks and how to save what was trained."""

    model: nn.Module
    method: str
    trainable: int
    callbacks: list[Any] = field(default_factory=list)
    custom_save: Any = None  # callable(model, dir) for non-PEFT models (train.train_adapter calls it)
    # searched methods: callable(train, dev, train_params, cell_dir, pad_id) → the Built to train
    search: Any = None
    search_minutes: float | None = None
    structure: list[str] | None = None  # searched methods: what the search kept


@dataclass
class BuildContext:
    """What a build may need besides the backbone and options: FanLoRA's setting, the schedule's length."""

    setting: Setting | None = None
    total_steps: int = 0
    dropout: float = 0.0


class Method:
    """One fine-tuning method. Subclasses set the class attributes and implement :meth:`build`, :meth:`load`."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    order: ClassVar[int] = 100  # position in tables (Table 1's column order for the built-in ones)
    needs_setting: ClassVar[bool] = False  # trains on a FanLoRA setting's modules (the grid gives it one)
    searched: ClassVar[bool] = False  # searches its structure on the task under a parameter budget first
    config_file: ClassVar[str | None] = None  # the file that marks a saved adapter folder as this method's

    def build(self, backbone: Backbone, opts: dict[str, Any], ctx: BuildContext) -> Built:
        raise NotImplementedError

    def owns(self, directory: Path) -> bool:
        """Whether ``directory`` holds an adapter this method saved."""
        return self.config_file is not None and (directory / self.config_file).is_file()

    def load(self, backbone: Backbone, directory: Path) -> nn.Module:
        raise NotImplementedError

    def trainable(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def describe(self, label: str) -> tuple[str, int]:
        """(what, layer) of one element of a searched structure, for the report's structure tables."""
        raise UserError(f"method {self.name} keeps no searched structure")


class PeftMethod(Method):
    """A PEFT tuner: saved by ``save_pretrained`` (adapter_config.json), loaded by ``PeftModel``."""

    peft_type: ClassVar[str]

    def owns(self, directory: Path) -> bool:
        config = directory / "adapter_config.json"
        if not config.is_file():
            return False
        try:
            return json.loads(config.read_text()).get("peft_type") == self.peft_type
        except (ValueError, UnicodeDecodeError, AttributeError):
            return False

    def load(self, backbone: Backbone, directory: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(backbone.model, str(directory))

    def wrap(self, backbone: Backbone, config: Any, callbacks: list[Any] | None = None) -> Built:
        from peft import get_peft_model

        peft = get_peft_model(backbone.model, config)
        return Built(peft, self.name, peft.get_nb_trainable_parameters()[0], callbacks=callbacks or [])


_REGISTRY: Registry[Method] = Registry(
    "method", "unknown method {name}: methods are {known}", lambda n, m: (m.order, n)
)


def register(method: Method, replace: bool = False) -> Method:
    """Make ``method`` available under ``method.name`` (to stage d, grids, reports, benchmarks)."""
    return _REGISTRY.register(method.name, method, replace)


unregister, get = _REGISTRY.unregister, _REGISTRY.get
names = _REGISTRY.names  # in table order


def check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's defaults updated with ``options``; an option the method does not have is refused."""
    defaults = get(method).defaults
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r} for method {method}: valid are {', '.join(sorted(defaults))}")
    return {**defaults, **options}


def build(
    method: str,
    backbone: Backbone,
    options: dict[str, Any] | None = None,
    setting: Setting | None = None,
    total_steps: int = 0,
    dropout: float = 0.0,
) -> Built:
    """Wrap ``backbone.model`` for ``method``; only the method's own parameters stay trainable."""
    opts = check_options(method, dict(options or {}))
    return get(method).build(backbone, opts, BuildContext(setting, total_steps, dropout))


def owner(directory: str | Path) -> Method | None:
    """The registered method whose saved adapter ``directory`` holds, if any."""
    where = Path(directory)
    return next((get(n) for n in names() if get(n).owns(where)), None)


def load(backbone: Backbone, directory: str | Path) -> nn.Module:
    """``backbone.model`` with the adapter saved in ``directory`` on top, whichever method saved it (any other
    PEFT adapter loads through PEFT as it is)."""
    where = Path(directory)
    method = owner(where)
    if method is not None:
        return method.load(backbone, where)
    if not (where / "adapter_config.json").is_file():
        raise UserError(f"{where} is not an adapter directory (no adapter_config.json, nor a baseline's config)")
    return PeftMethod.load(PeftMethod(), backbone, where)
