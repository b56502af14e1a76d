"""A bounded load test of `fanlora serve` on loopback: N concurrent clients for M seconds, 4 adapters.

    python benchmarks/load_test.py --setting runs/demo/setting.json [--clients 8] [--seconds 60]

Starts the real server (uvicorn, 127.0.0.1, a free port, an API key) over the embedded backbone with four
adapters on the setting (random LoRA weights, r=12: speed does not depend on their values), then runs
``--clients`` threads, each sending completions back to back for ``--seconds`` seconds through the ``openai``
client, every request to a randomly chosen adapter (or the base), greedy, ``--max-tokens`` new tokens. Prints
throughput, latency percentiles, the error count (the goal is 0) and how many engine batches served them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import openai
import uvicorn

from fanlora.backbone import load_backbone
from fanlora.latency.loadgen import PROMPTS
from fanlora.latency.timing import save_random_adapter
from fanlora.serving.engine import Engine
from fanlora.serving.server import Limits, create_app
from fanlora.setting import Setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--scheduler", choices=["continuous", "batch"], default="continuous")
    args = parser.parse_args()

    setting = Setting.read(args.setting)
    source = setting.backbone.get("source", "embedded")
    work = Path(tempfile.mkdtemp(prefix="fanlora-load-"))
    names = ["tenant-a", "tenant-b", "tenant-c", "tenant-d"]
    for i, name in enumerate(names):
        save_random_adapter(source, setting, work / name, seed=i)
    engine = Engine.from_backbone(load_backbone(source), setting)
    app = create_app(
        engine,
        work,
        api_key="load-test",
        limits=Limits(max_tokens=64, max_batch=args.max_batch, scheduler=args.scheduler),
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="load-test", max_retries=0, timeout=300)
    for name in names:  # load every adapter once before the clock starts
        client.completions.create(model=name, prompt="warm up", max_tokens=1, temperature=0)

    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            model = rng.choice([*names, "base"])
            start = time.monotonic()
            try:
                out = client.completions.create(
                    model=model, prompt=rng.choice(PROMPTS), max_tokens=args.max_tokens, temperature=0
                )
                with lock:
                    latencies.append(time.monotonic() - start)
                    tokens[0] += out.usage.completion_tokens
            except Exception as exc:  # counted, never fatal: the goal is zero
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    batches_before = app.state.scheduler.batches
    began = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - began
    server.should_exit = True
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else float("nan")

    batches = app.state.scheduler.batches - batches_before
    print(f"fanlora serve on loopback: embedded backbone, {setting.n_modules}-module setting, adapters {names} + base")
    print(f"{args.clients} clients for {args.seconds:.0f} s (wall {wall:.1f} s), max_tokens {args.max_tokens}, greedy")
    print(f"requests completed: {len(lat)}; errors: {len(errors)}")
    print(f"throughput: {len(lat) / wall:.2f} requests/s, {tokens[0] / wall:.1f} generated tokens/s")
    print(
        f"latency: p50 {pct(50):.2f} s, p90 {pct(90):.2f} s, p99 {pct(99):.2f} s, max {lat[-1] if lat else 0:.2f} s, "
        f"mean {statistics.mean(lat) if lat else 0:.2f} s"
    )
    unit = "decoding steps" if args.scheduler == "continuous" else "generate batches"
    print(
        f"scheduler: {args.scheduler}; {unit}: {batches}; most rows decoded together: {app.state.scheduler.peak_rows}"
    )
    for e in errors[:5]:
        print("error:", e)
    print(
        f"RESULT requests={len(lat)} errors={len(errors)} rps={len(lat) / wall:.2f} p50_s={pct(50):.2f} "
        f"p99_s={pct(99):.2f}"
    )


if __name__ == "__main__":
    main()
