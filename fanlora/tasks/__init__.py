"""Downstream tasks; importing this package registers every bundled task."""

from fanlora.tasks import boolq, copa, mmlu  # noqa: F401
from fanlora.tasks.base import MCExample, MCTask, get_task

__all__ = ["MCExample", "MCTask", "get_task"]
