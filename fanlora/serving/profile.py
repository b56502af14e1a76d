"""``fanlora profile``: what LoRA on one module of each kind costs the serving engine at decode, per backbone.

For every kind the engine is built with LoRA (rank ``r``, random factors) on that kind in *every* layer — one
module's cost alone is below the machine's noise — and timed against the bare backbone in balanced rounds
(:func:`fanlora.serving.timing.balanced_rounds`): the per-module cost of a kind is
``(median per-round time ratio − 1) / layers``. The profile is cached per backbone weights and thread count
(the costs depend on both) under ``$FANLORA_CACHE/profiles/``; ``fanlora select --budget latency=P%`` reads it,
and predicts a setting's slowdown as the sum of its modules' costs (:func:`predict`), which
``fanlora bench`` then puts beside the measured one.
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
    decode_seconds,
    per_round_ratios,
    prompt_ids,
    save_random_adapter,
    spread,
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
    backbone_name: str, settings: dict[str, Setting], r: int, prompt_tokens: int, new_tokens: int, rounds: int,
    say: Callable[[str], None] = print,
) -> dict[str, list[float]]:  # fmt: skip
    """name → per-round decode-time ratio of the engine on that setting to the bare backbone (one run)."""
    probe = load_backbone(backbone_name)
    tok = probe.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = prompt_ids(tok, prompt_tokens)
    base = probe.model.eval()
    runs: dict[str, Callable[[], float]] = {"base": lambda: decode_seconds(base, ids, new_tokens, 1, pad)}
    work = Path(tempfile.mkdtemp(prefix="fanlora-profile-"))
    for i, (name, setting) in enumerate(settings.items()):
        engine = Engine.from_backbone(load_backbone(backbone_name), setting)
        engine.load("t", save_random_adapter(backbone_name, setting, work / f"a{i}", i, r))
        engine.use(["t"])
        runs[name] = lambda e=engine: decode_seconds(e.model, ids, new_tokens, 1, pad)
        gc.collect()
    for fn in runs.values():  # warm-up, not timed
        fn()
    times = balanced_rounds(runs, rounds, on_round=lambda n: say(f"round {n + 1}/{rounds} done"))
    return {name: per_round_ratios(times, name, "base") for name in settings}


def run_profile(
    backbone_name: str, r: int = 12, prompt_tokens: int = 276, new_tokens: int = 32, rounds: int = 8,
    out: str | Path | None = None, say: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Profile every kind of ``backbone_name``; write it (default: the cache) and return it."""
    backbone = load_backbone(backbone_name)
    settings = {k: layer_setting(backbone, [k]) for k in backbone.layout.kinds}
    layers = backbone.layout.num_layers
    say(
        f"profiling {backbone.identity.get('name')}: LoRA r={r} on one kind in all {layers} layers vs the bare "
        f"backbone, {prompt_tokens}-token prompt, {new_tokens} new tokens, {rounds} balanced rounds, "
        f"{torch.get_num_threads()} threads"
    )
    ratios = overheads(backbone_name, settings, r, prompt_tokens, new_tokens, rounds, say)
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
        "new_tokens": new_tokens,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "kinds": kinds,
    }
    path = Path(out) if out else default_path(backbone.identity)
    atomic.write_json(path, profile)
    say("")
    say("| kind | time vs base, all layers (median [q1, q3]) | per module |")
    say("|---|---:|---:|")
    for kind, k in kinds.items():
        rr = k["ratio"]
        say(f"| {kind} | {rr['median']:.4f} [{rr['q1']:.4f}, {rr['q3']:.4f}] | {k['per_module'] * 100:+.3f}% |")
    say(f"profile → {path}")
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
