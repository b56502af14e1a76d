"""Multiple-choice tasks: examples, splits, prompt format and the training pair for stage d.

A task is one file in ``fanlora/tasks`` that defines a :class:`MCTask` subclass and registers it. Scoring
follows lm-evaluation-harness: a choice's log-likelihood is the summed log-probability of its tokens after
the context; ``acc`` takes the argmax, ``acc_norm`` divides by the choice's length in characters first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fanlora.errors import UserError


@dataclass
class MCExample:
    id: str
    context: str
    choices: list[str]  # continuations, each starting with the delimiter (" yes")
    label: int
    group: str = ""  # e.g. the MMLU subject: accuracy is also reported per group and macro-averaged


class MCTask:
    """Base class: subclasses set ``name``/``description`` and implement :meth:`load_split`."""

    name: str = ""
    description: str = ""
    splits: tuple[str, ...] = ("train", "dev", "test")

    def load_split(self, split: str) -> list[MCExample]:
        raise NotImplementedError

    def examples(self, split: str, limit: int | None = None) -> list[MCExample]:
        if split not in self.splits:
            raise UserError(f"task {self.name} has no split {split!r}: use one of {', '.join(self.splits)}")
        rows = self.load_split(split)
        return rows[:limit] if limit else rows

    @staticmethod
    def field(record: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
        value = record.get(key)
        if not isinstance(value, typ):
            raise UserError(f"{where}: field {key!r} missing or not {getattr(typ, '__name__', typ)}")
        return value


_REGISTRY: dict[str, type[MCTask]] = {}


def register(cls: type[MCTask]) -> type[MCTask]:
    _REGISTRY[cls.name] = cls
    return cls


def get_task(name: str) -> MCTask:
    from fanlora import tasks  # noqa: F401 - importing the package registers the bundled tasks

    if name not in _REGISTRY:
        raise UserError(f"unknown task {name!r}: known tasks are {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()
