"""FanLoRA adapters on vLLM's CPU build with and without the fanlora-vllm plugin, and `fanlora serve`, one run.

    python benchmarks/vllm.py --setting runs/demo/setting.json --out benchmarks/results/vllm.txt

Needs the vLLM venv (``bash scripts/setup-vllm.sh``). Five servers on loopback over the embedded backbone's
de-quantised weights (float32): stock vLLM (``FANLORA_SETTING=off``), vLLM with the plugin on the setting,
stock vLLM given the setting as ``fanlora export --engine vllm``'s per-layer ``--lora-target-modules`` list (no
plugin: what the plugin's slice skipping adds on top of the list), vLLM with the plugin on the all-modules
setting, and `fanlora serve`. Every adapter is a random r=12 PEFT
adapter: four on the setting ("FanLoRA") and four on all 210 modules ("all-module"). Each measurement:
``--clients`` closed-loop chat clients for ``--seconds`` (greedy, 16 tokens, the load test's six prompts;
client i cycles through the four adapters). While one server is measured the others are stopped (SIGSTOP on
their process groups), so an idle engine's polling cannot take CPU from it. Order per round: the eight
measurements shuffled, then the same in reverse (A-B-B-A); a ratio is taken within each half-round, and the
report gives its median and range. Before timing, the greedy text of every adapter is compared between stock
vLLM and the plugin. Time it with nothing else running.

Both engines run with their prefix caches as they ship: vLLM's automatic prefix caching (on by default, keyed by
LoRA) and `fanlora serve`'s per-adapter cache (``--prefix-cache-mb 64`` by default). ``--warmup S`` runs each
timed load for S untimed seconds first (steady state, as ``benchmarks/peer.py``); ``--no-all-modules`` leaves
the all-module adapters and their server out when only the FanLoRA comparison is wanted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

from peer import start  # the peer benchmark's server start (benchmarks/ is on sys.path)

from fanlora.backbone import resolve_source
from fanlora.latency.loadgen import closed_loop as load
from fanlora.latency.timing import save_random_adapter
from fanlora.latency.vllm_server import VllmServer, free_port
from fanlora.serving.export import vllm_target_modules
from fanlora.setting import Setting

FANLORA = [f"fan-{i}" for i in range(4)]
EVERYWHERE = [f"all-{i}" for i in range(4)]


def pause(proc, on: bool) -> None:
    os.killpg(proc.pid, signal.SIGSTOP if on else signal.SIGCONT)


def greedy(url: str, model: str) -> str:
    body = {"model": model, "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": "Hi!"}]}
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def adapters(setting: Setting, work: Path, everywhere_too: bool) -> tuple[dict[str, str], dict[str, str], Path]:
    everywhere = dataclasses.replace(
        setting, kept={n: list(setting.kinds) for n in range(setting.num_layers)}, k_max=len(setting.kinds)
    )
    everywhere.write(work / "all-setting.json")
    source = setting.backbone.get("source", "embedded")
    fan = {n: str(save_random_adapter(source, setting, work / n, seed=i)) for i, n in enumerate(FANLORA)}
    full = {
        n: str(save_random_adapter(source, everywhere, work / n, seed=10 + i))
        for i, n in enumerate(EVERYWHERE if everywhere_too else [])
    }
    return fan, full, work / "all-setting.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=0, help="untimed seconds of each timed load before it")
    parser.add_argument(
        "--no-all-modules", action="store_true", help="leave out the all-module adapters (one vLLM server fewer)"
    )
    parser.add_argument(
        "--dtype", default="float32", help="vLLM's --dtype: float32 on the CPU build, bfloat16 or float16 on a GPU"
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    setting = Setting.read(args.setting)
    model_dir, _ = resolve_source(setting.backbone.get("source", "embedded"))
    work = Path(tempfile.mkdtemp(prefix="fanlora-vllm-bench-"))
    fan, full, all_setting = adapters(setting, work, not args.no_all_modules)
    report: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    vllm = {
        "stock": VllmServer(model_dir, None, {**fan, **full}, log=str(work / "stock.log"), dtype=args.dtype),
        "plugin": VllmServer(model_dir, args.setting, fan, log=str(work / "plugin.log"), dtype=args.dtype),
        "listed": VllmServer(  # stock vLLM with `fanlora export --engine vllm`'s per-layer list, no plugin
            model_dir,
            None,
            fan,
            log=str(work / "listed.log"),
            dtype=args.dtype,
            target_modules=vllm_target_modules(setting),
        ),
        "plugin-all": VllmServer(model_dir, str(all_setting), full, log=str(work / "plugin-all.log"), dtype=args.dtype),
    }
    if args.no_all_modules:
        vllm.pop("plugin-all")
    procs = {}
    try:
        for name, server in vllm.items():  # one at a time: each start is timed by nobody, but all share 2 cores
            server.start().wait()
            procs[name] = server.proc
            pause(server.proc, True)
        port = free_port()
        cmd = [sys.executable, "-m", "fanlora", "serve", "--setting", args.setting, "--adapter-dir", str(work)]
        procs["fanlora"] = start([*cmd, "--port", str(port)], port, new_session=True)
        urls = {name: server.url for name, server in vllm.items()} | {"fanlora": f"http://127.0.0.1:{port}"}
        runs = {
            "vLLM, base": ("stock", ["base"]),
            "vLLM, 4 FanLoRA adapters": ("stock", list(fan)),
            "vLLM + plugin, 4 FanLoRA adapters": ("plugin", list(fan)),
            "vLLM + exported list, 4 FanLoRA adapters": ("listed", list(fan)),
            "vLLM, 4 all-module adapters": ("stock", list(full)),
            "vLLM + plugin (all-modules setting), 4 all-module adapters": ("plugin-all", list(full)),
            "fanlora serve, base": ("fanlora", ["base"]),
            "fanlora serve, 4 FanLoRA adapters": ("fanlora", list(fan)),
        }
        if args.no_all_modules:
            runs = {label: run for label, run in runs.items() if "all-module" not in label}
        measure(runs, urls, procs, args, say, fan)
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                pause(proc, False)
        for server in vllm.values():
            server.stop()
        if "fanlora" in procs:
            procs["fanlora"].terminate()
            procs["fanlora"].wait(30)
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


def measure(runs, urls, procs, args, say, fan) -> None:
    def only(name: str) -> None:
        for other, proc in procs.items():
            pause(proc, other != name)

    only("stock")
    stock_text = {m: greedy(urls["stock"], m) for m in fan}
    only("plugin")
    same = sum(greedy(urls["plugin"], m) == t for m, t in stock_text.items())
    say(f"greedy text, plugin vs stock vLLM: {same} of {len(fan)} adapters the same")
    only("listed")
    listed = sum(greedy(urls["listed"], m) == t for m, t in stock_text.items())
    say(f"greedy text, stock vLLM with the exported list vs stock vLLM: {listed} of {len(fan)} adapters the same")
    same = min(same, listed)
    for name, url in urls.items():  # warm-up: every adapter loaded, every server's first batches done
        only(name)
        for server, models in runs.values():
            if server == name:
                load(url + "/v1", models, 1, 4)
    results: dict[str, list[dict]] = {label: [] for label in runs}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = rng.sample(list(runs), len(runs))
        for label in order + order[::-1]:
            server, models = runs[label]
            only(server)
            if args.warmup:  # untimed: the same load first, so every server is timed in its steady state
                load(urls[server] + "/v1", models, args.clients, args.warmup)
            m = load(urls[server] + "/v1", models, args.clients, args.seconds)
            results[label].append(m)
            say(
                f"{label:<60} {m['requests']:4d} req, {m['errors']} errors, {m['rps']:5.2f} req/s, "
                f"p50 {m['p50']:.2f} s, p99 {m['p99']:.2f} s"
            )
    summarize(results, say, same, len(fan))


def summarize(results, say, same: int, n: int) -> None:
    def ratio(num: str, den: str) -> list[float]:
        return [a["rps"] / b["rps"] for a, b in zip(results[num], results[den], strict=True)]

    pairs = {
        "plugin_vs_stock_fanlora": ("vLLM + plugin, 4 FanLoRA adapters", "vLLM, 4 FanLoRA adapters"),
        "plugin_vs_listed_fanlora": ("vLLM + plugin, 4 FanLoRA adapters", "vLLM + exported list, 4 FanLoRA adapters"),
        "listed_vs_stock_fanlora": ("vLLM + exported list, 4 FanLoRA adapters", "vLLM, 4 FanLoRA adapters"),
        "plugin_vs_stock_all": (
            "vLLM + plugin (all-modules setting), 4 all-module adapters",
            "vLLM, 4 all-module adapters",
        ),
        "stock_fanlora_vs_stock_all": ("vLLM, 4 FanLoRA adapters", "vLLM, 4 all-module adapters"),
        "plugin_fanlora_vs_vllm_base": ("vLLM + plugin, 4 FanLoRA adapters", "vLLM, base"),
        "fanlora_serve_vs_plugin_fanlora": ("fanlora serve, 4 FanLoRA adapters", "vLLM + plugin, 4 FanLoRA adapters"),
        "fanlora_serve_base_vs_vllm_base": ("fanlora serve, base", "vLLM, base"),
        "fanlora_serve_vs_stock_fanlora": ("fanlora serve, 4 FanLoRA adapters", "vLLM, 4 FanLoRA adapters"),
    }
    line = []
    for key, (num, den) in pairs.items():
        if num not in results or den not in results:
            continue
        r = ratio(num, den)
        say(f"{num} / {den}: throughput {statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]")
        line.append(f"{key}={statistics.median(r):.3f}")
    errors = sum(m["errors"] for ms in results.values() for m in ms)
    say(f"RESULT {' '.join(line)} same_greedy_text={same}/{n} errors={errors}")


if __name__ == "__main__":
    main()
