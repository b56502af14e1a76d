"""The stage-b scorers, one file each; :mod:`~fanlora.scoring.scorers.registry` holds the protocol.

Every module of this package is imported here, so a new scorer is one new file that calls ``register``.
"""

from __future__ import annotations

import importlib
import pkgutil

from fanlora.scoring.scorers.registry import Assembled, Scorer, described, get, names, register, unregister

__all__ = ["Assembled", "Scorer", "described", "get", "names", "register", "unregister"]

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
