"""A run directory is the unit of output; ``run.json`` records the config that made it.

Re-running a command on a directory whose relevant config sections match continues the run (finished stages
are skipped, training resumes from its last checkpoint). A directory holding a *different* run is refused
unless ``--resume`` (continue with the stored config) or ``--overwrite`` (start again) is given.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fanlora import __version__, atomic
from fanlora.errors import UserError

RUN_FORMAT = "fanlora-run/1"


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix]


# Choices of *which* output a command writes, not what the run is: another scorer on the same run is fine.
PER_COMMAND = ("score.method", "score.shapley_budget", "score.seed", "score.memory_limit_gb")


def _pick(config: dict[str, Any], section: str, keys: set[str]) -> dict[str, Any]:
    return {k.split(".", 1)[1]: config[section][k.split(".", 1)[1]] for k in keys if k.startswith(section + ".")}


def prepare(
    path: str | Path,
    config: dict[str, Any],
    sections: list[str],
    resume: bool = False,
    overwrite: bool = False,
    inputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Create or re-open ``path``; return the config to use (the stored one under ``--resume``).

    ``inputs`` are files the run is made from besides its config (e.g. the setting a task adapter is trained
    on, by its sha256): they belong to the run's identity, and even ``--resume`` cannot change them.
    """
    path = Path(path)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass one")
    meta_path = path / "run.json"
    inputs = dict(inputs or {})
    if path.exists() and not path.is_dir():
        raise UserError(f"run directory {path} is a file: choose another --run-dir")
    if path.is_dir() and any(path.iterdir()) and not meta_path.is_file():
        # never delete a directory fanlora did not make, even under --overwrite
        raise UserError(f"{path} is not empty and is not a fanlora run: choose another --run-dir")
    if meta_path.is_file() and not overwrite:
        fix = "pass --overwrite to start this run again"
        meta = atomic.read_json(meta_path, fix)
        stored = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(stored, dict) or not isinstance(meta.get("inputs", {}), dict):
            raise UserError(f"{meta_path} is unreadable (no config in it): {fix}")
        for key, value in inputs.items():
            if meta.get("inputs", {}).get(key) != value:
                raise UserError(
                    f"{path} was made from another {key.removesuffix('_sha256')} ({key} differs): pass --overwrite "
                    "to replace that run, or choose another --run-dir"
                )
        diffs = [d for d in _differences(stored, config) if d.split(".")[0] in sections and d not in PER_COMMAND]
        if diffs and not resume:
            raise UserError(
                f"{path} holds a different run (config differs in {', '.join(diffs[:4])}): pass --resume "
                "to continue it with its stored config, --overwrite to replace it, or another --run-dir"
            )
        if resume:
            per_command = {d for d in PER_COMMAND if d.split(".")[0] in sections}
            config = {**stored, **{s: {**stored.get(s, {}), **_pick(config, s, per_command)} for s in sections}}
        else:
            config = {**stored, **{s: config[s] for s in sections if s in config}}
    elif overwrite and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": RUN_FORMAT, "fanlora_version": __version__, "config": config}
    if inputs:
        meta["inputs"] = inputs
    atomic.write_json(meta_path, meta)
    return config
