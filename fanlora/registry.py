"""One registry type for everything that is one file and registers itself: methods, scorers, tasks.

Modelled on PEFT's ``register_peft_method``: the name is the key, and a second registration of a name is
refused unless ``replace=True`` (a plugin or a test replacing a built-in says so). An unknown name is a
:class:`~fanlora.errors.UserError` that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from fanlora.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries; ``order`` sorts :meth:`names` (default: by name), ``unknown`` words the error for a name
    that is not there (``{name}`` and ``{known}`` are filled in)."""

    def __init__(self, what: str, unknown: str, order: Callable[[str, T], Any] | None = None) -> None:
        self.what, self.unknown, self.order = what, unknown, order
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, replace: bool = False) -> T:
        if name in self._entries and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered (pass replace=True to replace it)")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        if self.order is None:
            return sorted(self._entries)
        return sorted(self._entries, key=lambda n: self.order(n, self._entries[n]))

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UserError(self.unknown.format(name=repr(name), known=", ".join(self.names())))
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries
