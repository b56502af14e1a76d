"""Downstream tasks, one file each; importing this package imports every module in it, and each task's file
registers its class (``@register``), so a new task is one new file."""

import importlib
import pkgutil

from fanlora.tasks.base import REGISTRY, GenExample, GenTask, MCExample, MCTask, Task

__all__ = ["GenExample", "GenTask", "MCExample", "MCTask", "Task", "get_task", "known_tasks"]

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")


def known_tasks() -> list[str]:
    return REGISTRY.names()


def get_task(name: str, data: dict[str, str] | None = None) -> Task:
    return REGISTRY.get(name)(data)
