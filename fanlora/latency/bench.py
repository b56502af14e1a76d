"""``fanlora bench``: the paper's Table 3 on this machine, and the multi-tenant case, side by side in one run.

Part 1 (batch 1): the bare backbone, FanLoRA through this engine and through PEFT, LoRA on all modules,
AdaLoRA and (IA)3 (PEFT, unmerged), each decoding ``--new-tokens`` tokens after a ``--prompt-tokens``-token
prompt with beam 1 and beam 3 — the protocol of the paper's Table 3. Every configuration wraps its own modules
around the *same* weight tensors (:func:`fanlora.latency.timing.sharing`: a 7B model is on the GPU once), and
the runs are interleaved in balanced rounds (:func:`fanlora.latency.timing.balanced_rounds`: a shuffled
order, then its reverse — only ratios measured in the same run mean anything on a shared CPU); tokens/s are
medians over rounds, ratios are medians of the per-round ratios with their range. Peak memory above the level
before a decode is measured in a separate, untimed pass: CUDA's ``max_memory_allocated`` on a GPU, resident
memory on CPU (a sampler thread there would share the 2 cores). Then the engine's decode step against the
base's (:func:`fanlora.latency.profile.overheads`, the measure ``fanlora profile`` uses), beside what the
backbone's latency profile predicts when it has one.

Any backbone, any dtype, any device: ``--backbone shape:llama-2-7b --dtype bfloat16`` times the paper's shape
with random weights (:mod:`fanlora.backbone.shapes`); the setting, made on a real model, is then mapped onto
the shape by layer fraction (:meth:`fanlora.setting.Setting.fitted_to`) and the report says so.

Part 2 (multi-tenant): a batch of ``--tenants`` prompts, each with its own adapter, through the engine's
mixed batch; the same batch all on one adapter; and PEFT's ``adapter_names=`` mixed path.

Adapter weights are random (speed does not depend on their values). The baselines are the ones the experiment
grids train (:mod:`fanlora.methods`, the paper's sizes): FanLoRA r=12 on the setting's modules, LoRA r=4 on
all modules, AdaLoRA initial r=8 (target 4) on all modules, (IA)3 on K, V, Down.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fanlora import methods
from fanlora.backbone import Backbone, load_backbone
from fanlora.errors import UserError
from fanlora.latency import profile as latency
from fanlora.latency.rss import peak_memory
from fanlora.latency.timing import (
    balanced_rounds,
    decode_seconds,
    device_of,
    per_round_ratios,
    prompt_ids,
    save_random_adapter,
    sharing,
    spread,
)
from fanlora.methods.fanlora import ALPHA, RANK
from fanlora.serving.engine import Engine
from fanlora.setting import Setting


def _baseline(probe: Backbone, method: str) -> torch.nn.Module:
    """A Table 1 baseline exactly as ``fanlora experiment`` builds it (:func:`fanlora.methods.build`)."""
    model = methods.build(method, sharing(probe), total_steps=1000).model.eval()
    methods.randomize(model)
    return model


def configurations(probe: Backbone, setting: Setting, workdir: Path) -> dict[str, tuple[Any, Callable]]:
    """name → (model, route) where route() selects the adapter before a run (engine only). Every model shares
    ``probe``'s weight tensors (:func:`fanlora.latency.timing.sharing`): one copy of a 7B model on the GPU."""
    noop: Callable = lambda: None  # noqa: E731
    engine = Engine.from_backbone(sharing(probe), setting)
    engine.load("t0", save_random_adapter(probe, setting, workdir / "t0", 0))
    fan_peft = methods.build("fanlora", sharing(probe), {"r": RANK, "alpha": ALPHA}, setting).model.eval()
    methods.randomize(fan_peft)
    return {
        "base": (probe.model, noop),
        "fanlora (engine)": (engine.model, lambda: engine.use(["t0"])),
        "fanlora (PEFT)": (fan_peft, noop),
        "lora all (PEFT)": (_baseline(probe, "lora"), noop),
        "adalora (PEFT)": (_baseline(probe, "adalora"), noop),
        "ia3 (PEFT)": (_baseline(probe, "ia3"), noop),
    }


def _adapter_params(model: torch.nn.Module, base: torch.nn.Module) -> int:
    """Parameters a configuration adds to the backbone (its own tensors; the shared weights are not counted)."""
    shared = {id(p) for p in base.parameters()}
    own = sum(p.numel() for p in model.parameters() if id(p) not in shared)
    return own + sum(b.numel() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("A", "B"))


def _ratio(times: dict[Any, list[float]], num: Any, den: Any) -> float:
    """Median over rounds of the speed ratio num/den within a round (drift between rounds cancels)."""
    return statistics.median(d / n for n, d in zip(times[num], times[den], strict=True))


def table3(
    probe: Backbone, setting: Setting, work: Path, ids: torch.Tensor, new_tokens: int, rounds: int, pad: int, say
) -> dict[str, float]:
    """Batch-1 decode speed of every configuration in balanced rounds; peak memory in a separate pass after."""
    configs = configurations(probe, setting, work)
    runs: dict[str, Callable[[], float]] = {}
    for name, (model, route) in configs.items():
        for beams in (1, 3):
            runs[f"{name}|{beams}"] = lambda m=model, r=route, b=beams: (
                r(),
                decode_seconds(m, ids, new_tokens, b, pad),
            )[1]
    for fn in runs.values():  # warm-up, not timed
        fn()
    times = balanced_rounds(runs, rounds, on_round=lambda r: say(f"round {r + 1}/{rounds} done"))
    meter = peak_memory(device_of(probe.model))
    peak: dict[str, float] = {}
    for key, fn in runs.items():  # memory, untimed: the sampler thread would slow a timed decode on 2 cores
        with meter:
            fn()
        peak[key] = meter.mb
    weights_mb = sum(p.numel() * p.element_size() for p in probe.model.parameters()) / 2**20
    say("")
    say(
        f"| configuration | beam | resident adapter params | tokens/s | speed vs base (median [min, max] of rounds) "
        f"| peak {meter.name} above start (MB) |"
    )
    say("|---|---:|---:|---:|---:|---:|")
    for key, v in times.items():
        name, beams = key.split("|")
        s = spread([1 / x for x in per_round_ratios(times, key, f"base|{beams}")])
        say(
            f"| {name} | {beams} | {_adapter_params(configs[name][0], probe.model):,} | "
            f"{new_tokens / statistics.median(v):.2f} | {s['median']:.3f}x [{s['min']:.3f}, {s['max']:.3f}] | "
            f"{peak[key]:.0f} |"
        )
    say(
        f"(every configuration shares the backbone's {weights_mb:.0f} MB of weights; peaks are above that level; "
        "the engine's resident factors include its zero slot for the bare backbone)"
    )
    result = {
        "fanlora_vs_base": _ratio(times, "fanlora (engine)|1", "base|1"),
        "fanlora_vs_adalora": _ratio(times, "fanlora (engine)|1", "adalora (PEFT)|1"),
        "fanlora_vs_base_beam3": _ratio(times, "fanlora (engine)|3", "base|3"),
    }
    del configs, runs
    gc.collect()
    say("")
    say("decode steps, engine on this setting vs the bare backbone on the same weights (balanced rounds):")
    steps = latency.overheads(probe, {"engine": setting}, 12, ids.shape[1], 8, 6 * rounds, say)
    noise = spread(steps[latency.AGAIN])
    say(f"noise floor (base vs base): median {noise['median']:.4f} [q1 {noise['q1']:.4f}, q3 {noise['q3']:.4f}]")
    return result | {"step_time_vs_base": statistics.median(steps["engine"])}


def _stack_bytes(engine: Any) -> int:
    return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in engine.modules.values())


def multi_tenant(
    probe: Backbone, setting: Setting, work: Path, tenants: int, prompt_tokens: int, new_tokens: int,
    rounds: int, pad: int, say,
) -> dict[str, float]:  # fmt: skip
    """A batch of ``tenants`` prompts, one adapter each: the engine's mixed batch vs one adapter vs PEFT's."""
    from peft import PeftModel

    paths = [save_random_adapter(probe, setting, work / f"m{i}", 100 + i) for i in range(tenants)]
    engine = Engine.from_backbone(sharing(probe), setting)
    before = _stack_bytes(engine)
    for i, p in enumerate(paths):
        engine.load(f"m{i}", p)
    per_adapter_kb = (_stack_bytes(engine) - before) / tenants / 1024
    peft_model = PeftModel.from_pretrained(sharing(probe).model, str(paths[0]), adapter_name="m0")
    for i, p in enumerate(paths[1:], 1):
        peft_model.load_adapter(str(p), adapter_name=f"m{i}")
    peft_model.eval()
    tok = probe.tokenizer
    short = prompt_ids(tok, prompt_tokens, tenants)
    names = [f"m{i}" for i in range(tenants)]

    def engine_run(rows: list[str]) -> float:
        engine.use(rows)
        return decode_seconds(engine.model, short, new_tokens, 1, pad)

    def peft_one() -> float:
        peft_model.set_adapter("m0")
        return decode_seconds(peft_model, short, new_tokens, 1, pad)

    mixed, single, peft_mixed = (
        f"engine, {tenants} distinct adapters",
        "engine, one adapter",
        f"PEFT adapter_names, {tenants} distinct",
    )
    runs: dict[str, Callable[[], float]] = {
        mixed: lambda: engine_run(names),
        single: lambda: engine_run(["m0"] * tenants),
        peft_mixed: lambda: decode_seconds(peft_model, short, new_tokens, 1, pad, adapter_names=names),
        "PEFT, one adapter": peft_one,
    }
    for fn in runs.values():
        fn()  # warm-up
    mt = balanced_rounds(runs, rounds, seed=1)
    say("")
    say(f"multi-tenant: {tenants} prompts of {short.shape[1]} tokens, {new_tokens} new tokens each, greedy")
    say("| path | tokens/s | vs engine one adapter |")
    say("|---|---:|---:|")
    for k, v in mt.items():
        say(f"| {k} | {tenants * new_tokens / statistics.median(v):.1f} | {_ratio(mt, k, single):.3f}x |")
    say(f"memory per added adapter: {per_adapter_kb:.0f} KB of stacked factors")
    return {"mixed_vs_single": _ratio(mt, mixed, single), "mixed_vs_peft": _ratio(mt, mixed, peft_mixed)}


def _against_profile(
    setting: Setting, identity: dict[str, Any], step_ratio: float, prompt_tokens: int, say: Callable[[str], None]
) -> dict[str, float]:
    """The decode-step slowdown the backbone's latency profile predicts for this setting, beside the measured one."""
    measured = step_ratio - 1
    try:
        where, prof = latency.find_profile(identity)
    except UserError as exc:
        say(f"latency: decode step {measured * 100:+.2f}% vs base; no prediction ({exc})")
        return {"latency_measured": measured}
    predicted, (lo, hi) = latency.predict(setting, prof), latency.predict_interval(setting, prof)
    same = prof["prompt_tokens"] == prompt_tokens
    say(
        f"latency: profile {where} predicts {predicted * 100:+.2f}% [95% CI {lo * 100:+.2f}, {hi * 100:+.2f}] "
        f"decode-step time for this setting; measured "
        f"{measured * 100:+.2f}% (median of per-round ratios, engine vs base)"
        + ("" if same else f" — the profile timed steps after a {prof['prompt_tokens']}-token prompt")
    )
    warning = latency.resolution_warning(prof)
    if warning:
        say(f"latency: {warning}")
    return {"latency_predicted": predicted, "latency_measured": measured}


def run(
    setting_path: str | Path,
    backbone_name: str | None = None,
    prompt_tokens: int = 276,
    new_tokens: int = 32,
    rounds: int = 5,
    tenants: int = 16,
    say: Callable[[str], None] = print,
    tenant_prompt_tokens: int = 64,
    tenant_new_tokens: int = 16,
    dtype: str = "float32",
    device: str | None = "auto",
) -> dict[str, float]:
    """Both benchmarks; the RESULT line carries their ratios (``mixed_*``: ``tenants`` distinct adapters)."""
    read = Setting.read(setting_path)
    backbone_name = backbone_name or read.backbone.get("source", "embedded")
    probe = load_backbone(backbone_name, dtype, dict(read.module_paths), device, random_ok=True)
    setting = read.fitted_to(probe)
    tok = probe.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = prompt_ids(tok, prompt_tokens)
    say(
        f"backbone {backbone_name} ({dtype} on {device_of(probe.model)}); setting {setting_path} "
        f"({setting.n_modules} modules); prompt {ids.shape[1]} tokens, {new_tokens} new tokens, batch 1, "
        f"{rounds} rounds, {torch.get_num_threads()} threads"
    )
    if setting is not read:
        say(_mapping_note(read, setting, probe))
    work = Path(tempfile.mkdtemp(prefix="fanlora-bench-"))
    result = table3(probe, setting, work, ids, new_tokens, rounds, pad, say)
    result |= _against_profile(setting, probe.identity, result.pop("step_time_vs_base"), prompt_tokens, say)
    gc.collect()
    result |= multi_tenant(probe, setting, work, tenants, tenant_prompt_tokens, tenant_new_tokens, rounds, pad, say)
    say("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return result


def _mapping_note(read: Setting, mapped: Setting, probe: Backbone) -> str:
    ident = probe.identity
    vocab = ""
    if ident.get("config_vocab_size") and ident["config_vocab_size"] != ident.get("vocab_size"):
        vocab = (
            f"; vocabulary {ident['config_vocab_size']} raised to {ident['vocab_size']} to fit the embedded "
            "tokenizer (the output layer is that much wider)"
        )
    return (
        f"random weights ({ident.get('public_name')}: the shape of {ident.get('shape_of')}); the setting was made on "
        f"{mapped.source['from_backbone']} ({read.num_layers} layers, {read.n_modules} modules) and is mapped by "
        f"layer fraction to {mapped.num_layers} layers, {mapped.n_modules} modules{vocab}"
    )
