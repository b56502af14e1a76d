"""``fanlora profile``: what LoRA on one module of each kind costs the serving engine at decode, per backbone.

For every kind the engine is built with LoRA (rank ``r``, random factors) on that kind in *every* layer — one
module's cost alone is below the machine's noise — and its decode step (one token after a
``prompt_tokens``-token prompt, :func:`fanlora.latency.timing.step_runner`) is timed against the bare
backbone's in balanced rounds (:func:`fanlora.latency.timing.balanced_rounds`): the per-module cost of a kind
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

import numpy as np
import torch

from fanlora import atomic
from fanlora.backbone import Backbone, cache_dir, load_backbone
from fanlora.config import R1
from fanlora.errors import UserError
from fanlora.latency.timing import (
    balanced_rounds,
    per_round_ratios,
    prompt_ids,
    save_random_adapter,
    sharing,
    spread,
    step_runner,
)
from fanlora.serving.engine import Engine
from fanlora.setting import Setting

PROFILE_FORMAT = "fanlora-profile/1"
AGAIN = "base (again)"


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
    """Where the profile of this backbone is cached: per weights and thread count, and per dtype and device
    type unless float32 on CPU (a module's cost in bf16 on a GPU says nothing of its cost in fp32 on a CPU)."""
    threads = threads or torch.get_num_threads()
    dtype, device = identity.get("dtype", "float32"), str(identity.get("device", "cpu")).split(":")[0]
    where = "" if (dtype, device) == ("float32", "cpu") else f"-{dtype}-{device}"
    return cache_dir() / "profiles" / f"{identity.get('weights_digest', 'unknown')}{where}-t{threads}.json"


class Wirings:
    """Several settings' LoRA wrappings of *one* backbone model, swapped in and out in place.

    Separate copies of the backbone differ in speed by themselves on this machine (an A/A test of two copies
    of the same weights gave a 5.6 % median difference, one copy against itself 1.5 %), so every
    configuration is timed on the same weights in memory: :meth:`activate` puts one setting's wrapped modules
    in place (``None``: the bare backbone) before its timed steps.
    """

    def __init__(self, backbone: Backbone, settings: dict[str, Setting], adapters: dict[str, Path]) -> None:
        self.model = backbone.model.eval()
        self.wrapped: dict[str, dict[str, torch.nn.Module]] = {}
        self.bases: dict[str, torch.nn.Module] = {}
        for name, setting in settings.items():
            engine = Engine(self.model, backbone.tokenizer, setting, backbone.identity)
            engine.load("t", adapters[name])
            engine.use(["t"])
            self.wrapped[name] = dict(engine.modules)
            self.bases.update({full: w.base for full, w in engine.modules.items()})
            self.activate(None)

    def _put(self, full: str, module: torch.nn.Module) -> None:
        parent, _, child = full.rpartition(".")
        setattr(self.model.get_submodule(parent), child, module)

    def activate(self, name: str | None) -> None:
        for full, base in self.bases.items():
            self._put(full, base)
        for full, wrapped in self.wrapped.get(name, {}).items():
            self._put(full, wrapped)


def overheads(
    backbone: Backbone | str, settings: dict[str, Setting], r: int, prompt_tokens: int, steps: int, rounds: int,
    say: Callable[[str], None] = print,
) -> dict[str, list[float]]:  # fmt: skip
    """name → per-round decode-step time ratio of the engine on that setting to the bare backbone (one run).

    ``"base (again)"`` is the bare backbone timed as a configuration of its own: its ratios are the
    machine's noise floor (an A/A test).
    """
    backbone = sharing(backbone) if isinstance(backbone, Backbone) else load_backbone(backbone)
    ids = prompt_ids(backbone.tokenizer, prompt_tokens)
    work = Path(tempfile.mkdtemp(prefix="fanlora-profile-"))
    adapters = {n: save_random_adapter(backbone, s, work / f"a{i}", i, r) for i, (n, s) in enumerate(settings.items())}
    gc.collect()
    wirings = Wirings(backbone, settings, adapters)
    models: dict[str, tuple[Any, Callable[[], None] | None]] = {
        name: (wirings.model, lambda n=name: wirings.activate(n)) for name in settings
    }
    models["base"] = models[AGAIN] = (wirings.model, lambda: wirings.activate(None))
    ratios = step_ratios(models, ids, steps, rounds, say)
    wirings.activate(None)
    return ratios


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
    backbone_name: str, r: int = R1, prompt_tokens: int = 276, steps: int = 8, rounds: int = 30,
    out: str | Path | None = None, say: Callable[[str], None] = print, dtype: str = "float32", device: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    """Profile every kind of ``backbone_name`` (in ``dtype`` on ``device``; a ``shape:`` backbone too); write it
    (default: the cache) and return it."""
    backbone = load_backbone(backbone_name, dtype, device=device, random_ok=True)
    settings = {k: layer_setting(backbone, [k]) for k in backbone.layout.kinds}
    layers = backbone.layout.num_layers
    say(
        f"profiling {backbone.identity.get('name')} ({dtype} on {backbone.identity['device']}): LoRA r={r} on one "
        f"kind in all {layers} layers vs the bare "
        f"backbone, decode steps after a {prompt_tokens}-token prompt ({steps} per run), {rounds} balanced rounds, "
        f"{torch.get_num_threads()} threads"
    )
    ratios = overheads(backbone, settings, r, prompt_tokens, steps, rounds, say)
    kinds = {}
    for kind in settings:
        s = spread(ratios[kind])
        lo, hi = median_interval(ratios[kind])
        kinds[kind] = {
            "per_module": (s["median"] - 1) / layers,
            "per_module_ci": [(lo - 1) / layers, (hi - 1) / layers],
            "ratio": s,
            "ratios": ratios[kind],
        }
    noise = spread(ratios[AGAIN])
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
        "noise": {"ratio": noise, "ci": list(median_interval(ratios[AGAIN])), "ratios": ratios[AGAIN]},
    }
    path = default_path(backbone.identity)  # where select --budget finds it
    atomic.write_json(path, profile)
    if out:
        atomic.write_json(out, profile)
    say("")
    say("| kind | step time vs base, all layers: median [q1, q3] | per module [95% CI of the median] |")
    say("|---|---:|---:|")
    for kind, k in kinds.items():
        rr, (lo, hi) = k["ratio"], k["per_module_ci"]
        say(
            f"| {kind} | {rr['median']:.4f} [{rr['q1']:.4f}, {rr['q3']:.4f}] | "
            f"{k['per_module'] * 100:+.3f}% [{lo * 100:+.3f}, {hi * 100:+.3f}] |"
        )
    lo, hi = profile["noise"]["ci"]
    say(
        f"| noise floor: base vs base (A/A) | {noise['median']:.4f} [{noise['q1']:.4f}, {noise['q3']:.4f}] | "
        f"95% CI of the median [{lo:.4f}, {hi:.4f}] |"
    )
    warning = resolution_warning(profile)
    if warning:
        say(f"warning: {warning}")
    say(f"profile → {path}" + (f" and {out}" if out else ""))
    return profile


def read_profile(path: str | Path) -> dict[str, Any]:
    return atomic.read_artifact(path, PROFILE_FORMAT, "latency profile", "fanlora profile")


def find_profile(identity: dict[str, Any], path: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The given profile, or the cached one of this backbone — for this thread count if there is one, else the
    newest (a grid may select on one thread for a server that runs on two); refuse another backbone's."""
    where = Path(path) if path else default_path(identity)
    if not path and not where.is_file():
        others = sorted(where.parent.glob(f"{identity.get('weights_digest', 'unknown')}-t*.json"), key=_mtime)
        where = others[-1] if others else where
    if not where.is_file():
        raise UserError(
            f"no latency profile for backbone {identity.get('source') or identity.get('name')} at {where}: run "
            f"`fanlora profile --backbone {identity.get('source', 'embedded')}` first (minutes), or pass --profile"
        )
    profile = read_profile(where)
    if profile["backbone"].get("weights_digest") != identity.get("weights_digest"):
        raise UserError(f"{where} profiles another backbone: profile this one with `fanlora profile`")
    return where, profile


def median_interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median (scipy.stats.bootstrap)."""
    if len(values) < 3 or len(set(values)) == 1:
        return min(values), max(values)
    from scipy import stats as sps  # here: `fanlora bench` and serving need no scipy

    res = sps.bootstrap(
        (np.asarray(values),), np.median, confidence_level=0.95, n_resamples=2000, method="percentile",
        random_state=np.random.default_rng(seed),
    )  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def predict_interval(setting: Setting, profile: dict[str, Any], resamples: int = 2000) -> tuple[float, float]:
    """95 % interval of :func:`predict`: every kind's rounds resampled (bootstrap), the sum recomputed each time."""
    rng = np.random.default_rng(0)
    counts = {k: sum(k in kinds for kinds in setting.kept.values()) for k in profile["kinds"]}
    total = np.zeros(resamples)
    for kind, n in counts.items():
        ratios = np.asarray(profile["kinds"][kind]["ratios"])
        if n == 0 or ratios.size == 0:
            continue
        medians = np.median(ratios[rng.integers(0, ratios.size, (resamples, ratios.size))], axis=1)
        total += n * np.maximum(0.0, (medians - 1) / profile["layers"])
    return float(np.quantile(total, 0.025)), float(np.quantile(total, 0.975))


def resolution_warning(profile: dict[str, Any]) -> str | None:
    """Why this profile's costs cannot be trusted, if they cannot: the machine's noise hides them."""
    unresolved = [k for k, v in profile["kinds"].items() if v.get("per_module_ci", [0, 1])[0] <= 0]
    lo, hi = profile.get("noise", {}).get("ci", [1.0, 1.0])
    biased = not lo <= 1.0 <= hi
    if not unresolved and not biased:
        return None
    why = (
        [f"{len(unresolved)} of {len(profile['kinds'])} kinds' costs are not distinguishable from zero"]
        if unresolved
        else []
    )
    if biased:
        why.append(f"the bare backbone timed against itself differs by [{lo - 1:+.1%}, {hi - 1:+.1%}] (95% CI)")
    return (
        "the latency profile is below this machine's timing resolution (" + "; ".join(why) + "): latency budgets "
        "built on it are not reliable here; profile on an idle or larger machine, or use a params budget"
    )


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def per_module(profile: dict[str, Any]) -> dict[str, float]:
    return {k: v["per_module"] for k, v in profile["kinds"].items()}


def predict(setting: Setting, profile: dict[str, Any]) -> float:
    """Predicted decode slowdown of the engine on ``setting`` (fraction of the bare backbone's time)."""
    costs = per_module(profile)
    return sum(max(0.0, costs[k]) for kinds in setting.kept.values() for k in kinds)
