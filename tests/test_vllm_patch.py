"""The fanlora-vllm plugin's GPU-path hazards, checked on CPU: slice runs, Dynamo tracing, the compile-cache hash,
Ray's environment. Everything but the hash runs here without vLLM (the slice patch is plain torch); the hash test
runs in vLLM's venv and skips without it (``FANLORA_REQUIRE_VLLM=1`` turns that into a failure)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fanlora_vllm.patch import active_runs, carry_to_ray, skip_inactive_slices
from fanlora_vllm.placement import Placement

from fanlora.latency.vllm_server import VllmServer, vllm_python

SIZES = (8, 4, 4)  # q, k, v of a GQA projection


class CountingPunica:
    """The signature of vLLM's ``PunicaWrapperBase.add_lora_linear`` (one adapter, every token on it)."""

    def __init__(self):
        self.calls = 0

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, offset_start=0):
        self.calls += 1
        offset = offset_start
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            y[:, offset : offset + size] += (x @ a[0, 0].T @ b[0, 0].T) * scale
            offset += size
        return y


class Packed(torch.nn.Module):
    """A stand-in for vLLM's ``MergedQKVParallelLinearWithLoRA``: the attributes its LoRA path reads."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.output_slices = SIZES
        self.lora_a_stacked = tuple(torch.randn(1, 1, 2, 6, generator=g) for _ in SIZES)
        self.lora_b_stacked = tuple(torch.randn(1, 1, s, 2, generator=g) for s in SIZES)
        self.punica_wrapper = CountingPunica()

    def _apply_lora_to_output(self, x, output):  # vLLM's: every slice in one call
        return self.punica_wrapper.add_lora_linear(
            output, x, self.lora_a_stacked, self.lora_b_stacked, 1.0, self.output_slices
        )


def _expected(layer: Packed, x: torch.Tensor, active: tuple[bool, ...]) -> torch.Tensor:
    out, offset = torch.zeros(x.shape[0], sum(SIZES)), 0
    for on, a, b, size in zip(active, layer.lora_a_stacked, layer.lora_b_stacked, SIZES, strict=True):
        if on:
            out[:, offset : offset + size] = x @ a[0, 0].T @ b[0, 0].T
        offset += size
    return out


def test_contiguous_active_slices_are_one_run():
    assert active_runs((False, True, True), SIZES) == ((1, 3, 8),)  # K+V: one call at q_size
    assert active_runs((True, False, True), SIZES) == ((0, 1, 0), (2, 3, 12))  # Q+V: two
    assert active_runs((True, True), (6, 6)) == ((0, 2, 0),)
    assert active_runs((False, False, True), SIZES) == ((2, 3, 12),)


@pytest.mark.parametrize(
    ("active", "calls"), [((False, True, True), 1), ((True, False, True), 2), ((True, True, False), 1)]
)
def test_one_punica_call_per_run_and_the_same_output(active, calls):
    layer, x = Packed(), torch.randn(5, 6)
    skip_inactive_slices(layer, active, inplace=True)
    out = layer._apply_lora_to_output(x, torch.zeros(5, sum(SIZES)))
    assert layer.punica_wrapper.calls == calls
    torch.testing.assert_close(out, _expected(layer, x, active))


def test_the_patched_layer_compiles_with_fullgraph_and_matches_eager():
    """CUDA compiles vLLM's model with fullgraph=True: a graph break in the patch would fail the server at start."""
    layer, x = Packed(seed=1), torch.randn(3, 1, 6)  # 3-D, as the transformers backend passes it
    skip_inactive_slices(layer, (False, True, True), inplace=False)
    eager = layer._apply_lora_to_output(x, torch.zeros(3, 1, sum(SIZES)))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: layer._apply_lora_to_output(x, y), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, torch.zeros(3, 1, sum(SIZES))), eager)
    assert type(layer).__name__ == "Packed" and isinstance(layer, Packed)  # a subclass, shared per class
    other = Packed(seed=2)
    skip_inactive_slices(other, (True, False, True), inplace=True)
    assert type(other) is type(layer) and other.fanlora_runs != layer.fanlora_runs


def test_ray_workers_are_asked_for_the_setting():
    env = {"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": "HF_TOKEN"}
    carry_to_ray(env)
    carry_to_ray(env)  # idempotent: every vLLM process registers the plugin
    assert env["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"] == "HF_TOKEN,FANLORA_SETTING"
    empty: dict[str, str] = {}
    carry_to_ray(empty)
    assert empty == {"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": "FANLORA_SETTING"}


def test_the_digest_is_the_modules_not_the_path():
    a = Placement({"model.layers.0.self_attn.v_proj"}, "one/setting.json")
    assert a.digest == Placement({"model.layers.0.self_attn.v_proj"}, "two/setting.json").digest
    assert a.digest != Placement({"model.layers.0.self_attn.o_proj"}, "one/setting.json").digest


HASHES = textwrap.dedent("""
    from vllm.config.lora import LoRAConfig
    from fanlora_vllm.patch import patch_config_hash
    from fanlora_vllm.placement import Placement
    config = LoRAConfig(max_lora_rank=8, max_loras=2)
    hashes = [config.compute_hash()]
    for module in ("v_proj", "o_proj", "v_proj"):
        patch_config_hash(Placement({f"model.layers.0.self_attn.{module}"}, "setting.json"))
        hashes.append(config.compute_hash())
    print(" ".join(hashes))
""")


def test_the_setting_enters_vllms_config_hash():
    """vLLM's compile cache is keyed by the config hash: a server with another setting, or none, must not match."""
    python = vllm_python()
    if python is None:
        if os.environ.get("FANLORA_REQUIRE_VLLM") == "1":
            pytest.fail("FANLORA_REQUIRE_VLLM=1 but there is no vLLM venv: run bash scripts/setup-vllm.sh")
        pytest.skip("no vLLM venv (bash scripts/setup-vllm.sh)")
    plugin = Path(__file__).parents[1] / "plugins" / "vllm"  # this checkout's plugin, not the installed copy
    env = {**os.environ, "PYTHONPATH": str(plugin)}
    done = subprocess.run([python, "-c", HASHES], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    stock, v, o, v_again = done.stdout.split()
    assert len({stock, v, o}) == 3 and v == v_again and len(v) == len(stock)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_harness_passes_the_dtype_asked_for(monkeypatch, dtype):
    """vLLM's GPU LoRA kernels take only fp16/bf16: the harness must not hard-code float32."""
    monkeypatch.setenv("FANLORA_VLLM_PYTHON", sys.executable)
    cmd = VllmServer("model", None, dtype=dtype).command()
    assert cmd[cmd.index("--dtype") + 1] == dtype
