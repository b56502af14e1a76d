"""``fanlora profile --engine vllm``: what stock vLLM charges for LoRA, per packed projection kind.

Stock vLLM does not charge per (layer, module) as fanlora's engine (and vLLM with the fanlora-vllm plugin)
does: ``--lora-target-modules`` wraps a projection kind in *every* layer, through its packed ``qkv_proj`` and
``gate_up_proj``, and computes every slice. So its cost model is per group — ``qkv_proj`` (Q, K, V),
``o_proj`` (O), ``gate_up_proj`` (G, U), ``down_proj`` (D) on Llama-family models — paid once a setting uses
any of the group's kinds in any layer.

The profile measures it through vLLM's own server (the vLLM venv, :mod:`fanlora.latency.vllm_server`): a server without
LoRA, and one per group started with ``--lora-target-modules <group>`` serving four random rank-``r`` adapters on
that group's kinds in every layer. Each is timed closed loop (``clients`` chat clients, 16 greedy tokens, the
other SIGSTOPped), base-group-group-base per round against the one base server; a group's cost is the median
over half-rounds of base throughput ÷ its throughput − 1. ``fanlora select --budget latency=P% --engine vllm``
then picks the groups (:func:`fanlora.stages.budget.select_by_groups`). Summing group costs assumes they add up;
the profile does not test that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fanlora import atomic
from fanlora.backbone import cache_dir, load_backbone, resolve_source
from fanlora.errors import UserError
from fanlora.latency.loadgen import closed_loop
from fanlora.latency.profile import layer_setting
from fanlora.latency.timing import save_random_adapter

VLLM_PROFILE_FORMAT = "fanlora-vllm-profile/1"
PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj"}
PACKED["up_proj"] = "gate_up_proj"  # vLLM's Llama packed_modules_mapping, read backwards


def groups_of(paths: dict[str, str]) -> dict[str, list[str]]:
    """vLLM group name → the setting kinds it holds (``paths``: kind → module path inside a layer)."""
    groups: dict[str, list[str]] = {}
    for kind, path in paths.items():
        leaf = path.rsplit(".", 1)[-1]
        groups.setdefault(PACKED.get(leaf, leaf), []).append(kind)
    return groups


def default_path(identity: dict[str, Any]) -> Path:
    return cache_dir() / "profiles" / f"{identity.get('weights_digest', 'unknown')}-vllm.json"


def read_vllm_profile(identity: dict[str, Any], path: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    where = Path(path) if path else default_path(identity)
    if not where.is_file():
        raise UserError(
            f"no vLLM latency profile at {where}: run `fanlora profile --engine vllm` first (needs "
            "`bash scripts/setup-vllm.sh`; ~10 min), or pass --profile"
        )
    profile = atomic.read_artifact(where, VLLM_PROFILE_FORMAT, "vLLM latency profile", "fanlora profile --engine vllm")
    if profile["backbone"].get("weights_digest") != identity.get("weights_digest"):
        raise UserError(f"{where} profiles another backbone: profile this one with `fanlora profile --engine vllm`")
    return where, profile


def _servers(backbone_name: str, r: int, work: Path) -> tuple[dict, dict[str, list[str]], Any]:
    from fanlora.latency.vllm_server import VllmServer

    backbone = load_backbone(backbone_name)
    groups = groups_of(dict(backbone.layout.paths))
    model_dir, _ = resolve_source(backbone_name)
    servers, models = {"base": VllmServer(model_dir, None, lora=False)}, {"base": ["base"]}
    for gi, (group, kinds) in enumerate(groups.items()):
        setting = layer_setting(backbone, kinds)
        adapters = {
            f"{group}-{i}": str(save_random_adapter(backbone_name, setting, work / f"{group}-{i}", 10 * gi + i, r))
            for i in range(4)
        }
        servers[group] = VllmServer(model_dir, None, adapters, target_modules=[group], max_lora_rank=max(16, r))
        models[group] = list(adapters)
    return servers, models, backbone


def run_vllm_profile(
    backbone_name: str, r: int, clients: int = 8, seconds: float = 15.0, rounds: int = 1,
    out: str | Path | None = None, say: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Profile stock vLLM's LoRA cost per group on ``backbone_name``; write it (default: the cache).

    A vLLM server holds ~6 GB here, so only two run at once: the base stays up, each group's server is
    started, timed against it (base, group, group, base per round) and stopped before the next one.
    """
    work = Path(tempfile.mkdtemp(prefix="fanlora-vllm-profile-"))
    servers, models, backbone = _servers(backbone_name, r, work)
    say(f"profiling vLLM on {backbone.identity.get('name')}: LoRA r={r} per group {', '.join(list(servers)[1:])}")
    groups = groups_of(dict(backbone.layout.paths))
    record: dict[str, dict[str, Any]] = {}
    base = servers.pop("base")
    try:
        base.log = str(work / "base.log")
        base.start().wait()
        for group, server in servers.items():
            server.log = str(work / f"{group}.log")
            try:
                server.start().wait()
                rps = _measure({"base": base, group: server}, models, clients, seconds, rounds, say)
            finally:
                _resume(server)
                server.stop()
            ratios = [b / g - 1 for b, g in zip(rps["base"], rps[group], strict=True)]
            record[group] = {"kinds": groups[group], "ratios": ratios, "slowdown": statistics.median(ratios)}
            record[group]["base_rps"], record[group]["rps"] = rps["base"], rps[group]
    finally:
        _resume(base)
        base.stop()
    profile = {
        "format": VLLM_PROFILE_FORMAT, "engine": "vllm", "backbone": backbone.identity, "r": r,
        "clients": clients, "seconds": seconds, "rounds": rounds, "groups": record,
    }  # fmt: skip
    path = default_path(backbone.identity)
    atomic.write_json(path, profile)
    if out:
        atomic.write_json(out, profile)
    say("| vLLM group (kinds) | throughput slowdown vs no LoRA: median [range over half-rounds] |")
    say("|---|---:|")
    for group, row in record.items():
        say(f"| {group} ({','.join(row['kinds'])}) | {row['slowdown']:+.1%} [{min(row['ratios']):+.1%}, "
            f"{max(row['ratios']):+.1%}] |")  # fmt: skip
    say(f"profile → {path}" + (f" and {out}" if out else ""))
    return profile


def _resume(server) -> None:
    if server.proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGCONT)


def _measure(servers, models, clients: int, seconds: float, rounds: int, say) -> dict[str, list[float]]:
    """A-B-B-A rounds over ``servers`` (name → server), each timed while the others are SIGSTOPped."""

    def only(name: str) -> None:
        for other, server in servers.items():
            os.killpg(server.proc.pid, signal.SIGCONT if other == name else signal.SIGSTOP)

    for name, server in servers.items():  # warm-up: adapters loaded, first batches done
        only(name)
        closed_loop(server.url + "/v1", models[name], 1, 4)
    rps: dict[str, list[float]] = {name: [] for name in servers}
    for _ in range(rounds):
        order = list(servers)
        for name in order + order[::-1]:
            only(name)
            m = closed_loop(servers[name].url + "/v1", models[name], clients, seconds)
            if m["errors"]:
                raise RuntimeError(f"vLLM ({name}) answered {m['errors']} errors while profiling: see its log")
            rps[name].append(m["rps"])
            say(f"  {name:<14} {m['rps']:.2f} req/s")
    return rps
