"""``fanlora profile``: what LoRA on one module of each kind costs the serving engine at decode, per backbone.

For every kind the engine is built with LoRA (rank ``r``, random factors) on that kind in *every* layer — one
module's cost alone is below the machine's noise — and its decode step (one token after a
``prompt_tokens``-token prompt, :func:`fanlora.serving.timing.step_runner`) is timed against the bare
backbone's in balanced rounds (:func:`fanlora.serving.timing.balanced_rounds`): the per-module cost of a kind
is ``(median per-round time ratio − 1) / layers``. Whole ``generate`` calls were tried first and were too
noisy here (quartiles ±5 % around 1–6 % effects over 8 rounds); short interleaved steps are not.

The profile is cached per backbone weights and thread count (the costs depend on both) under
``$FANLORA_CACHE/profiles/``; ``fanlora select --budget latency=P%`` reads it and predicts a setting's
slowdown as the sum of its modules' costs (:func:`predict`), which ``fanlora bench`` then puts beside the
measured one.
"""

from __future__ import annotations

import gc
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fanlora import atomic
from fanlora.backbone import Backbone, cache_dir, load_backbone
from fanlora.errors import UserError
from fanlora.serving.engine import Engine
from fanlora.serving.timing import (
    balanced_rounds,
    per_round_ratios,
    prompt_ids,
    save_random_adapter,
    spread,
    step_runner,
)
from fanlora.setting import Setting

PROFILE_FORMAT = "fanlora-profile/1"


def layer_setting(backbone: Backbone, kinds: list[str]) -> Setting:
    """A setting with the same ``kinds`` in every layer of ``backbone``."""
    layout = backbone.layout
    return Setting(
        backbone=backbone.identity,
        layers_path=layout.layers_path,
        num_layers=layout.num_layers,
        module_paths=dict(layout.paths),
        k_max=len(kinds),
        kept={n: list(kinds) for n in range(layout.num_layers)},
        source={"rule": "fixed:" + ",".join(kinds)},
    )


def default_path(identity: dict[str, Any], threads: int | None = None) -> Path:
    threads = threads or torch.get_num_threads()
    return cache_dir() / "profiles" / f"{identity.get('weights_digest', 'unknown')}-t{threads}.json"


def overheads(
    backbone_name: str, settings: dict[str, Setting], r: int, prompt_tokens: int, steps: int, rounds: int,
    say: Callable[[str], None] = print,
) -> dict[str, list[float]]:  # fmt: skip
    """name → per-round decode-step time ratio of the engine on that setting to the bare backbone (one run)."""
    probe = load_backbone(backbone_name)
    ids = prompt_ids(probe.tokenizer, prompt_tokens)
    models: dict[str, tuple[Any, Callable[[], None] | None]] = {"base": (probe.model.eval(), None)}
    work = Path(tempfile.mkdtemp(prefix="fanlora-profile-"))
    for i, (name, setting) in enumerate(settings.items()):
        engine = Engine.from_backbone(load_backbone(backbone_name), setting)
        engine.load("t", save_random_adapter(backbone_name, setting, work / f"a{i}", i, r))
        models[name] = (engine.model, lambda e=engine: e.use(["t"]))
        gc.collect()
    return step_ratios(models, ids, steps, rounds, say)


def step_ratios(
    models: dict[str, tuple[Any, Callable[[], None] | None]], ids: torch.Tensor, steps: int, rounds: int,
    say: Callable[[str], None] = print,
) -> dict[str, list[float]]:  # fmt: skip
    """Per-round step-time ratio of every model in ``models`` to ``models["base"]`` (name → (model, route))."""
    runs = {name: step_runner(model, ids, steps, route) for name, (model, route) in models.items()}
    for fn in runs.values():  # warm-up, not timed
        fn()
    every = max(1, rounds // 4)
    times = balanced_rounds(
        runs, rounds, on_round=lambda n: say(f"round {n + 1}/{rounds} done") if (n + 1) % every == 0 else None
    )
    return {name: per_round_ratios(times, name, "base") for name in models if name != "base"}


def run_profile(
    backbone_name: str, r: int = 12, prompt_tokens: int = 276, steps: int = 8, rounds: int = 30,
    out: str | Path | None = None, say: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Profile every kind of ``backbone_name``; write it (default: the cache) and return it."""
    backbone = load_backbone(backbone_name)
    settings = {k: layer_setting(backbone, [k]) for k in backbone.layout.kinds}
    layers = backbone.layout.num_layers
    say(
        f"profiling {backbone.identity.get('name')}: LoRA r={r} on one kind in all {layers} layers vs the bare "
        f"backbone, decode steps after a {prompt_tokens}-token prompt ({steps} per run), {rounds} balanced rounds, "
        f"{torch.get_num_threads()} threads"
    )
    ratios = overheads(backbone_name, settings, r, prompt_tokens, steps, rounds, say)
    kinds = {}
    for kind, values in ratios.items():
        s = spread(values)
        kinds[kind] = {"per_module": (s["median"] - 1) / layers, "ratio": s, "ratios": values}
    profile = {
        "format": PROFILE_FORMAT,
        "backbone": backbone.identity,
        "r": r,
        "layers": layers,
        "prompt_tokens": prompt_tokens,
        "steps": steps,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "kinds": kinds,
    }
    path = default_path(backbone.identity)  # where select --budget finds it
    atomic.write_json(path, profile)
    if out:
        atomic.write_json(out, profile)
    say("")
    say("| kind | time vs base, all layers (median [q1, q3]) | per module |")
    say("|---|---:|---:|")
    for kind, k in kinds.items():
        rr = k["ratio"]
        say(f"| {kind} | {rr['median']:.4f} [{rr['q1']:.4f}, {rr['q3']:.4f}] | {k['per_module'] * 100:+.3f}% |")
    say(f"profile → {path}" + (f" and {out}" if out else ""))
    return profile


def read_profile(path: str | Path) -> dict[str, Any]:
    return atomic.read_artifact(path, PROFILE_FORMAT, "latency profile", "fanlora profile")


def find_profile(identity: dict[str, Any], path: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The given profile, or the cached one of this backbone and thread count; refuse another backbone's."""
    where = Path(path) if path else default_path(identity)
    if not where.is_file():
        raise UserError(
            f"no latency profile for backbone {identity.get('source') or identity.get('name')} with "
            f"{torch.get_num_threads()} threads at {where}: run `fanlora profile --backbone "
            f"{identity.get('source', 'embedded')}` first (a few minutes), or pass --profile"
        )
    profile = read_profile(where)
    if profile["backbone"].get("weights_digest") != identity.get("weights_digest"):
        raise UserError(f"{where} profiles another backbone: profile this one with `fanlora profile`")
    return where, profile


def per_module(profile: dict[str, Any]) -> dict[str, float]:
    return {k: v["per_module"] for k, v in profile["kinds"].items()}


def predict(setting: Setting, profile: dict[str, Any]) -> float:
    """Predicted decode slowdown of the engine on ``setting`` (fraction of the bare backbone's time)."""
    costs = per_module(profile)
    return sum(max(0.0, costs[k]) for kinds in setting.kept.values() for k in kinds)
