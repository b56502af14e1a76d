"""The fanlora-vllm plugin on vLLM's CPU build: real vLLM servers on loopback over the embedded backbone.

Two vLLM servers start side by side — with the plugin (``FANLORA_SETTING``) and stock — beside `fanlora serve`
in a thread, all serving the same random adapters on a setting that mixes kinds per layer (so q/k/v and
gate/up are packed with some slices on and some off). They skip without the vLLM venv
(``bash scripts/setup-vllm.sh``); CI sets ``FANLORA_REQUIRE_VLLM=1``, which turns the skip into a failure.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import urllib.error
import urllib.request

import pytest
from helpers import serve_in_thread, setting_for

from fanlora.backbone import load_backbone, resolve_source
from fanlora.latency.timing import save_random_adapter
from fanlora.latency.vllm_server import VllmServer, vllm_python
from fanlora.serving.engine import Engine
from fanlora.serving.export import vllm_target_modules
from fanlora.serving.server import Limits, create_app

pytestmark = pytest.mark.slow
if vllm_python() is None:
    if os.environ.get("FANLORA_REQUIRE_VLLM") == "1":
        raise RuntimeError("FANLORA_REQUIRE_VLLM=1 but there is no vLLM venv: run bash scripts/setup-vllm.sh")
    pytest.skip("no vLLM venv (bash scripts/setup-vllm.sh)", allow_module_level=True)

PATTERN = [("V", "O"), ("Q", "G"), ("K", "D"), ("U", "V"), ("Q", "K")]  # layer n keeps PATTERN[n % 5]
PROMPTS = ["Name a colour.", "What is 2 + 3?", "Write one word about the sea.", "Say hello in French."]
PACKED = {"qkv_proj": ("Q", "K", "V"), "gate_up_proj": ("G", "U"), "o_proj": ("O",), "down_proj": ("D",)}
TOKENS = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model_dir, _ = resolve_source("embedded")
    backbone = load_backbone("embedded")
    base = setting_for(backbone)
    setting = dataclasses.replace(base, kept={n: list(PATTERN[n % 5]) for n in range(base.num_layers)})
    setting.write(root / "setting.json")
    adapters = root / "adapters"
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        save_random_adapter("embedded", setting, adapters / name, seed=i, std=0.05)
    other = setting_for(backbone, kinds=("Q", "O"))  # Q and O in every layer: some of it outside the pattern
    save_random_adapter("embedded", other, root / "outside", seed=7, std=0.05)
    static = {name: str(adapters / name) for name in ("alpha", "beta")}
    servers = {
        "plugin": VllmServer(model_dir, str(root / "setting.json"), static, report=str(root / "plugin.json")),
        "stock": VllmServer(model_dir, None, static, report=str(root / "stock.json")),
        "listed": VllmServer(  # stock vLLM told the setting by `fanlora export --engine vllm`'s list
            model_dir, None, static, report=str(root / "listed.json"), target_modules=vllm_target_modules(setting)
        ),
    }
    for name, server in servers.items():
        server.log = str(root / f"{name}.log")
        server.start()
    engine = Engine.from_backbone(backbone, setting)
    app = create_app(engine, adapters, None, Limits(max_tokens=64, max_batch=8))
    srv, thread, port = serve_in_thread(app)
    try:
        for server in servers.values():
            server.wait()
        outside = sorted(set(other.modules) - set(setting.modules))
        yield {"root": root, "setting": setting, "outside": outside, "fanlora": f"http://127.0.0.1:{port}", **servers}
    finally:
        for server in servers.values():
            server.stop()
        srv.should_exit = True
        thread.join(timeout=10)


def post(url: str, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def chat(url: str, model: str, prompt: str) -> str:
    body = {"model": model, "max_tokens": TOKENS, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
    status, text = post(url, "/v1/chat/completions", body)
    assert status == 200, text
    return json.loads(text)["choices"][0]["message"]["content"]


def expected_wrapping(setting) -> dict[str, list[bool]]:
    """vLLM's module name → active slices, derived from the setting alone (not from the plugin's code)."""
    want = {}
    for n in range(setting.num_layers):
        kept = setting.kept.get(n, [])
        for packed, kinds in PACKED.items():
            where = "self_attn" if packed in ("qkv_proj", "o_proj") else "mlp"
            active = [k in kept for k in kinds]
            if any(active):
                want[f"model.layers.{n}.{where}.{packed}"] = active
    return want


def test_the_plugin_wraps_exactly_the_settings_modules(world):
    plugin = json.loads((world["root"] / "plugin.json").read_text())["wrapped"]
    stock = json.loads((world["root"] / "stock.json").read_text())["wrapped"]
    assert plugin == expected_wrapping(world["setting"])
    n = world["setting"].num_layers
    layers = {name: active for name, active in stock.items() if ".layers." in name}
    assert len(layers) == 4 * n and all(all(active) for active in layers.values())  # every projection, every slice
    assert set(stock) - set(layers) == {"model.embed_tokens", "logits_processor"}  # stock: the tied head too
    assert len(plugin) < len(stock)


def test_greedy_text_is_the_same_with_and_without_the_plugin_and_in_fanlora_serve(world):
    for model in ("base", "alpha", "beta"):
        for prompt in PROMPTS:
            ours = chat(world["fanlora"], model, prompt)
            assert chat(world["plugin"].url, model, prompt) == ours, (model, prompt)
            assert chat(world["stock"].url, model, prompt) == ours, (model, prompt)
    assert chat(world["fanlora"], "alpha", PROMPTS[0]) != chat(world["fanlora"], "base", PROMPTS[0])


def test_stock_vllm_with_the_exported_list_wraps_the_plugins_modules_and_answers_the_same(world):
    """No plugin, no patch: vLLM matches --lora-target-modules against full names, so the exported list places
    LoRA per layer (every slice of a packed projection is computed; the plugin computes only the active ones)."""
    plugin = json.loads((world["root"] / "plugin.json").read_text())["wrapped"]
    listed = json.loads((world["root"] / "listed.json").read_text())["wrapped"]
    assert set(listed) == set(plugin)
    assert all(all(active) for active in listed.values())
    for model in ("base", "alpha", "beta"):
        for prompt in PROMPTS[:2]:
            assert chat(world["listed"].url, model, prompt) == chat(world["plugin"].url, model, prompt), (model, prompt)


def test_mixed_adapter_batches_answer_each_request_on_its_own_adapter(world):
    url = world["plugin"].url
    jobs = [(m, p) for m in ("base", "alpha", "beta") for p in PROMPTS] * 2
    alone = {job: chat(url, *job) for job in set(jobs)}
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: chat(url, *job), jobs))
    assert together == [alone[job] for job in jobs]


def test_load_lora_adapter_serves_setting_adapters_and_refuses_others(world):
    url, root = world["plugin"].url, world["root"]
    status, text = post(url, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(root / "adapters/gamma")})
    assert status == 200, text
    assert chat(url, "gamma", PROMPTS[1]) == chat(world["fanlora"], "gamma", PROMPTS[1])
    status, text = post(url, "/v1/load_lora_adapter", {"lora_name": "outside", "lora_path": str(root / "outside")})
    assert status == 400, text
    outside = world["outside"]
    assert f"{len(outside)} module(s) outside the FanLoRA setting" in text and outside[0] in text
    body = {"model": "outside", "messages": [{"role": "user", "content": "x"}]}
    status, text = post(url, "/v1/chat/completions", body)
    assert status == 404, text  # never served as the base
    body = {"lora_name": "outside", "lora_path": str(root / "outside")}
    status, text = post(world["stock"].url, "/v1/load_lora_adapter", body)
    assert status == 200, text  # stock vLLM takes it: the refusal is the plugin's


ENGINE_SIDE = """
import types
from vllm.lora import worker_manager
from fanlora_vllm.patch import patch_manager
from fanlora_vllm.placement import Placement
manager = worker_manager.WorkerLoRAManager
manager._load_adapter = lambda self, req: types.SimpleNamespace(loras=dict.fromkeys([req.module]))
patch_manager(Placement({"model.layers.0.self_attn.v_proj"}, "s.json"))
for module in ("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj"):
    try:
        manager._load_adapter(None, types.SimpleNamespace(lora_path="/a", module=module))
        print("served")
    except ValueError as exc:
        print("refused:", exc)
"""


def test_the_engine_refuses_an_adapter_outside_the_setting_too():
    """Loads that skip the API server's check (an offline ``LLM``, a LoRA resolver) meet the worker's."""
    import subprocess

    run = subprocess.run([str(vllm_python()), "-c", ENGINE_SIDE], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    inside, outside = run.stdout.strip().splitlines()[-2:]
    assert inside == "served"
    assert outside.startswith("refused: adapter /a puts LoRA on 1 module(s) outside")


OFFLINE = """
import sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
model, inside, outside = sys.argv[1:4]
llm = LLM(model=model, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=512)
greedy = SamplingParams(temperature=0, max_tokens=4)
try:
    llm.generate(["Name a colour."], greedy, lora_request=LoRARequest("outside", 1, outside))
    print("outside: served")
except Exception as exc:
    print("outside: refused:", type(exc).__name__, str(exc).splitlines()[0])
for name, request in (("inside", LoRARequest("inside", 2, inside)), ("base", None)):
    out = llm.generate(["Name a colour."], greedy, lora_request=request)
    print(f"{name}: served", len(out[0].outputs[0].token_ids))
"""


def test_the_offline_llm_refuses_an_outside_adapter_for_that_request_and_keeps_serving(world):
    """The offline ``LLM`` API has no API-server check: the frontend's refusal must come before the engine core,
    where a load error inside a model step would end the engine for every later request."""
    import subprocess

    server = world["plugin"]
    env = {**server.environment(), "VLLM_CPU_KVCACHE_SPACE": "1"}
    args = [server.model_dir, str(world["root"] / "adapters" / "alpha"), str(world["root"] / "outside")]
    run = subprocess.run([str(vllm_python()), "-c", OFFLINE, *args], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.split(":")[0] in ("outside", "inside", "base")]
    assert lines[0].startswith("outside: refused:") and "outside the FanLoRA setting" in lines[0], lines
    assert lines[1:] == ["inside: served 4", "base: served 4"], lines
