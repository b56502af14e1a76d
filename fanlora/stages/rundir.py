"""A run directory is the unit of output; ``run.json`` records the config that made it. This module is the one
place that knows what a run directory holds and when a command may write into one.

Re-running a command on a directory whose relevant config sections match continues the run (finished stages
are skipped, training resumes from its last checkpoint). A directory holding a *different* run is refused
unless ``--resume`` (continue with the stored config) or ``--overwrite`` (start again) is given. A command
that fails on a fresh directory leaves nothing behind (:func:`discarded_if_fresh`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fanlora import __version__, atomic, dist
from fanlora.config import Config, load_config, per_command_keys
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
PER_COMMAND = per_command_keys()

#: The config sections each command's run is keyed on: a change in any other section is not another run.
SECTIONS = {
    "search": ["backbone", "search"],
    "score": ["backbone", "search", "score"],
    "stability": ["backbone", "search", "score", "select"],
    "finetune": ["backbone", "finetune", "evaluate"],
    "demo": ["backbone", "search", "score", "select", "finetune", "evaluate"],
}


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


def stored_config(path: str | Path) -> dict[str, Any] | None:
    """The config a run's first command stored (later stages reuse it), without the per-command choices (which
    scorer the last command ran is not part of the run: they default afresh); ``None`` if there is no run."""
    meta = Path(path) / "run.json"
    if not meta.is_file():
        return None
    stored = atomic.read_json(meta, "pass --overwrite to start this run again")
    config = stored.get("config") if isinstance(stored, dict) else None
    if not isinstance(config, dict):
        return None
    for key in PER_COMMAND:
        section, name = key.split(".")
        config.get(section, {}).pop(name, None)
    return config


def open_run(
    path: str | Path, cfg: Config, command: str, resume: bool, overwrite: bool, inputs: dict[str, str] | None = None
) -> Config:
    """:func:`prepare` for ``command`` (its :data:`SECTIONS`); under torchrun rank 0 checks and writes run.json
    and the other ranks read the config it settled on."""
    path = Path(path)

    def prep() -> dict:
        return prepare(path, cfg.to_dict(), SECTIONS[command], resume, overwrite, inputs)

    if dist.world_size() > 1:
        import torch
        from accelerate import PartialState

        # without cpu=True accelerate sees no distributed setup on a CPU-only machine and every rank is "main"
        state = PartialState(cpu=not torch.cuda.is_available())
        with state.main_process_first():
            data = prep() if state.is_main_process else json.loads((path / "run.json").read_text())["config"]
    else:
        data = prep()
    return load_config(data)


@contextlib.contextmanager
def discarded_if_fresh(path: str | Path | None) -> Iterator[None]:
    """After bad input, a full disk, a crash or Ctrl-C on a new run, leave no directory behind that holds only
    our run.json (a run that existed before is never touched)."""
    where = Path(path) if path is not None else None
    fresh = where is not None and not (where / "run.json").exists()
    try:
        yield
    except BaseException:
        if fresh and dist.is_main() and where.is_dir() and [p.name for p in where.iterdir()] == ["run.json"]:
            shutil.rmtree(where)
        raise
