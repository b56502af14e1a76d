"""What every decode-speed measurement here shares: the prompt, one timed ``generate``, a balanced run order.

Used by ``fanlora bench`` and ``fanlora profile`` so that a profile's prediction and a bench's measurement
time the same thing. Only ratios of configurations measured in the same run mean anything on a shared CPU;
:func:`balanced_rounds` runs every configuration twice per round, in a shuffled order and then its reverse
(ABBA generalised), so a drift within a round weighs on every configuration alike. Nothing samples memory
while a decode is timed.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fanlora.backbone import Backbone, load_backbone
from fanlora.methods import randomize
from fanlora.setting import Setting


def prompt_ids(tok: Any, n: int, rows: int = 1) -> torch.Tensor:
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:n]] * rows)


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a clock read before this times the launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sharing(backbone: Backbone) -> Backbone:
    """Another model over the *same* weight tensors, with modules of its own that PEFT or the engine can wrap.

    Every configuration a benchmark compares is one of these: a 7B model fits a GPU once, not six times, and no
    configuration is faster for sitting on a luckier copy of the weights (two copies of the same weights differed
    by 5.6 % here, :class:`fanlora.latency.profile.Wirings`)."""
    model = backbone.model
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return Backbone(copy.deepcopy(model, memo), backbone.tokenizer, backbone.layout, backbone.identity)


def decode_seconds(model: Any, ids: torch.Tensor, new_tokens: int, beams: int, pad: int, **extra: Any) -> float:
    """Wall time of one greedy (or beam) ``generate`` of exactly ``new_tokens`` tokens after ``ids``."""
    device = device_of(model)
    ids = ids.to(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=beams,
            pad_token_id=pad,
            **extra,
        )
    synchronize(device)
    return time.perf_counter() - start


def step_runner(
    model: Any, ids: torch.Tensor, steps: int, route: Callable[[], None] | None = None
) -> Callable[[], float]:
    """A callable timing ``steps`` single-token decode steps at a fixed position after the prompt ``ids``.

    The prompt is prefilled once; every step feeds one token against that cache, which is then cropped back,
    so every call does the same work. A whole ``generate`` call (prefill, sampling, a growing cache) takes
    seconds and drifts with the machine; steps of a few tens of ms can be interleaved finely between
    configurations, which is what makes the few-percent costs of LoRA modules measurable on a shared CPU.
    """
    if route:
        route()
    device = device_of(model)
    with torch.no_grad():
        out = model(input_ids=ids.to(device), use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def run() -> float:
        if route:
            route()
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                model(input_ids=token, cache=cache, use_cache=True)
                cache.crop(-1)  # back to the prompt: every step does the same work
        synchronize(device)
        return time.perf_counter() - start

    return run


def save_random_adapter(
    backbone: str | Backbone, setting: Setting, path: Path, seed: int, r: int = 12, std: float = 0.02
) -> Path:
    """A PEFT LoRA adapter of rank ``r`` on the setting's modules with random factors (speed ignores values;
    equivalence tests raise ``std`` so that the adapter visibly changes the text). Given a loaded backbone, the
    adapter is made on a :func:`sharing` copy of it (nothing is loaded again); given a name, it is loaded (a
    ``shape:`` name too: this is a timing helper)."""
    from peft import get_peft_model

    base = sharing(backbone) if isinstance(backbone, Backbone) else load_backbone(backbone, random_ok=True)
    model = get_peft_model(base.model, setting.lora_config(r, 2 * r))
    randomize(model, seed, std)
    model.save_pretrained(path)
    setting.write(path / "setting.json")
    return path


def balanced_rounds(
    runs: dict[str, Callable[[], float]], rounds: int, seed: int = 0, on_round: Callable[[int], None] | None = None
) -> dict[str, list[float]]:
    """name → per-round time (mean of its two runs in the round); order shuffled per round, then reversed."""
    rng = random.Random(seed)
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = rng.sample(names, len(names))
        got: dict[str, list[float]] = {n: [] for n in names}
        for name in order + order[::-1]:
            got[name].append(runs[name]())
        for name in names:
            times[name].append(statistics.fmean(got[name]))
        if on_round:
            on_round(r)
    return times


def per_round_ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """Time ratio num/den within each round (> 1: ``num`` is slower)."""
    return [a / b for a, b in zip(times[num], times[den], strict=True)]


def ratio_interval(ratios: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Geometric mean of per-round ratios and its t-interval over rounds (on the log scale, where a ratio's
    noise is symmetric). Rounds are the independent units; with few of them a t quantile, not a bootstrap:
    scipy's bootstrap of four values has only a handful of distinct resamples."""
    from scipy import stats  # here: serving and `fanlora bench` need no scipy (a lent GPU may not have it)

    logs = np.log(np.asarray(ratios, dtype=float))
    mean = float(logs.mean())
    if len(logs) < 2:
        return {"mean": math.exp(mean), "low": float("nan"), "high": float("nan")}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs)))
    return {"mean": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half)}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and the range and quartiles of per-round ratios."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values)}
