"""``fanlora bench``: the paper's Table 3 on this machine, and the multi-tenant case, side by side in one run.

Part 1 (batch 1): the bare backbone, FanLoRA through this engine and through PEFT, LoRA on all modules,
AdaLoRA and (IA)3 (PEFT, unmerged), each decoding ``--new-tokens`` tokens after a ``--prompt-tokens``-token
prompt with beam 1 and beam 3. Every configuration is its own copy of the backbone, and the runs are
interleaved round by round (the machine is shared and noisy: only ratios measured in the same run mean
anything); tokens/s are medians over rounds, ratios are medians of the per-round ratios (each round's
configurations run back to back, so slow drift of the machine cancels), with the peak resident memory
above the level before the run.

Part 2 (multi-tenant): a batch of ``--tenants`` prompts, each with its own adapter, through the engine's
mixed batch; the same batch all on one adapter; and PEFT's ``adapter_names=`` mixed path.

Adapter weights are random (speed does not depend on their values); ranks follow the paper: FanLoRA r=12 on
the setting's modules, LoRA r=4 on all modules, AdaLoRA initial r=12 on all modules, (IA)3 on K, V, Down.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from fanlora.backbone import Backbone, load_backbone
from fanlora.setting import Setting


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 10 ms."""

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process(os.getpid())
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join()

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _randomize(model: torch.nn.Module, marker: str) -> None:
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if marker in name:
            p.data.normal_(0, 0.02)


def _peft(backbone_name: str, config: Any, marker: str) -> torch.nn.Module:
    from peft import get_peft_model

    model = get_peft_model(load_backbone(backbone_name).model, config).eval()
    _randomize(model, marker)
    return model


def save_random_adapter(backbone_name: str, setting: Setting, path: Path, seed: int, r: int = 12) -> Path:
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_backbone(backbone_name).model, setting.lora_config(r, 2 * r))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.02)
    model.save_pretrained(path)
    setting.write(path / "setting.json")
    return path


def configurations(backbone_name: str, setting: Setting, workdir: Path) -> dict[str, tuple[Any, Callable]]:
    """name → (model, route) where route() selects the adapter before a run (engine only)."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig

    from fanlora.serving.engine import Engine

    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    noop: Callable = lambda: None  # noqa: E731
    base = load_backbone(backbone_name).model.eval()
    engine = Engine.from_backbone(load_backbone(backbone_name), setting)
    engine.load("t0", save_random_adapter(backbone_name, setting, workdir / "t0", 0))
    fan_peft = _peft(backbone_name, setting.lora_config(12, 24), "lora_")
    lora = _peft(backbone_name, LoraConfig(r=4, lora_alpha=8, target_modules=all_linear), "lora_")
    adalora = _peft(
        backbone_name,
        AdaLoraConfig(init_r=12, target_r=8, total_step=1000, tinit=10, tfinal=10, target_modules=all_linear),
        "lora_",
    )
    ia3 = _peft(
        backbone_name,
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "ia3_",
    )
    return {
        "base": (base, noop),
        "fanlora (engine)": (engine.model, lambda: engine.use(["t0"])),
        "fanlora (PEFT)": (fan_peft, noop),
        "lora all (PEFT)": (lora, noop),
        "adalora (PEFT)": (adalora, noop),
        "ia3 (PEFT)": (ia3, noop),
    }


def _decode(model: Any, ids: torch.Tensor, new_tokens: int, beams: int, pad: int, **extra: Any) -> float:
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
    return time.perf_counter() - start


def run(
    setting_path: str | Path,
    backbone_name: str | None = None,
    prompt_tokens: int = 276,
    new_tokens: int = 32,
    rounds: int = 5,
    tenants: int = 16,
    tenant_prompt_tokens: int = 64,
    tenant_new_tokens: int = 16,
    say: Callable[[str], None] = print,
) -> dict[str, float]:
    setting = Setting.read(setting_path)
    backbone_name = backbone_name or setting.backbone.get("source", "embedded")
    probe: Backbone = load_backbone(backbone_name)
    setting.validate(probe)
    tok = probe.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:prompt_tokens]])
    say(
        f"backbone {backbone_name}; setting {setting_path} ({setting.n_modules} modules); "
        f"prompt {ids.shape[1]} tokens, {new_tokens} new tokens, batch 1, {rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    work = Path(tempfile.mkdtemp(prefix="fanlora-bench-"))
    configs = configurations(backbone_name, setting, work)
    del probe
    gc.collect()
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in configs for b in (1, 3)}
    peak: dict[tuple[str, int], float] = dict.fromkeys(times, 0.0)
    for model, route in configs.values():  # warm-up (both beam widths), not timed
        route()
        _decode(model, ids, 2, 1, pad)
        _decode(model, ids, 2, 3, pad)
    for r in range(rounds):
        for beams in (1, 3):
            for name, (model, route) in configs.items():
                route()
                with PeakRSS() as mem:
                    times[(name, beams)].append(_decode(model, ids, new_tokens, beams, pad))
                peak[(name, beams)] = max(peak[(name, beams)], mem.mb)
        say(f"round {r + 1}/{rounds} done")
    tps = {k: new_tokens / statistics.median(v) for k, v in times.items()}

    def paired(num: tuple[str, int], den: tuple[str, int]) -> float:
        """Median over rounds of the speed ratio num/den within a round (drift between rounds cancels)."""
        return statistics.median(d / n for n, d in zip(times[num], times[den], strict=True))

    say("")
    say("| configuration | beam | tokens/s | vs base (median of per-round ratios) | peak RSS above start (MB) |")
    say("|---|---:|---:|---:|---:|")
    for (name, beams), v in tps.items():
        ratio = paired((name, beams), ("base", beams))
        say(f"| {name} | {beams} | {v:.2f} | {ratio:.3f}x | {peak[(name, beams)]:.0f} |")

    # --- multi-tenant ------------------------------------------------------------------------------------------
    from peft import PeftModel

    from fanlora.serving.engine import Engine

    for name in list(configs):
        if name != "base":
            configs.pop(name)
    gc.collect()
    paths = [save_random_adapter(backbone_name, setting, work / f"m{i}", 100 + i) for i in range(tenants)]
    engine = Engine.from_backbone(load_backbone(backbone_name), setting)
    rss = psutil.Process(os.getpid()).memory_info().rss
    stack_bytes = sum(
        m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in engine.modules.values()
    )
    for i, p in enumerate(paths):
        engine.load(f"m{i}", p)
    per_adapter_kb = (
        (
            sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in engine.modules.values())
            - stack_bytes
        )
        / tenants
        / 1024
    )
    rss_per_adapter_kb = (psutil.Process(os.getpid()).memory_info().rss - rss) / tenants / 1024
    peft_model = PeftModel.from_pretrained(load_backbone(backbone_name).model, str(paths[0]), adapter_name="m0")
    for i, p in enumerate(paths[1:], 1):
        peft_model.load_adapter(str(p), adapter_name=f"m{i}")
    peft_model.eval()
    short = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:tenant_prompt_tokens]] * tenants)
    names = [f"m{i}" for i in range(tenants)]
    runs: dict[str, Callable[[], float]] = {
        f"engine, {tenants} distinct adapters": lambda: (
            engine.use(names),
            _decode(engine.model, short, tenant_new_tokens, 1, pad),
        )[1],
        "engine, one adapter": lambda: (
            engine.use(["m0"] * tenants),
            _decode(engine.model, short, tenant_new_tokens, 1, pad),
        )[1],
        f"PEFT adapter_names, {tenants} distinct": lambda: _decode(
            peft_model, short, tenant_new_tokens, 1, pad, adapter_names=names
        ),
        "PEFT, one adapter": lambda: (
            peft_model.set_adapter("m0"),
            _decode(peft_model, short, tenant_new_tokens, 1, pad),
        )[1],
    }
    for fn in runs.values():
        fn()  # warm-up
    mt: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            mt[k].append(fn())
    mt_tps = {k: tenants * tenant_new_tokens / statistics.median(v) for k, v in mt.items()}

    def mt_paired(num: str, den: str) -> float:
        return statistics.median(d / n for n, d in zip(mt[num], mt[den], strict=True))

    say("")
    say(f"multi-tenant: {tenants} prompts of {short.shape[1]} tokens, {tenant_new_tokens} new tokens each, greedy")
    say("| path | tokens/s | vs engine one adapter |")
    say("|---|---:|---:|")
    for k, v in mt_tps.items():
        say(f"| {k} | {v:.1f} | {mt_paired(k, 'engine, one adapter'):.3f}x |")
    say(
        f"memory per added adapter: {per_adapter_kb:.0f} KB of stacked factors (RSS grew {rss_per_adapter_kb:.0f} KB "
        "per adapter while loading)"
    )
    result = {
        "fanlora_vs_base": paired(("fanlora (engine)", 1), ("base", 1)),
        "fanlora_vs_adalora": paired(("fanlora (engine)", 1), ("adalora (PEFT)", 1)),
        "mixed16_vs_single": mt_paired(f"engine, {tenants} distinct adapters", "engine, one adapter"),
        "mixed16_vs_peft": mt_paired(f"engine, {tenants} distinct adapters", f"PEFT adapter_names, {tenants} distinct"),
    }
    say("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return result
