"""Downstream tasks; importing this package registers every bundled task (one file each)."""

from fanlora.tasks import boolq, copa, gsm8k, mmlu, mtbench, sql, squad  # noqa: F401
from fanlora.tasks.base import GenExample, GenTask, MCExample, MCTask, Task, get_task, known_tasks

__all__ = ["GenExample", "GenTask", "MCExample", "MCTask", "Task", "get_task", "known_tasks"]
