"""Open-loop benchmark: the continuous scheduler against the batch scheduler, Poisson arrivals, in one run.

    python benchmarks/continuous.py --setting runs/demo/setting.json --out benchmarks/results/continuous.txt

Both schedulers drive one engine (the embedded backbone, the setting's modules wrapped, four random r=12
adapters: speed does not depend on their values). First the batch scheduler's capacity C is measured closed
loop (every request queued at once: completed requests per second). Then, for each rate in ``--rates`` × C, one
fixed request stream — Poisson arrivals, tenants drawn from the four adapters and the bare backbone, chat
prompts, ``max_tokens`` uniform in [8, 48], greedy — is played against each scheduler in A-B-B-A order (so
neither always runs first or on a warmer machine). Requests are submitted straight to the schedulers (no HTTP:
``load_test.py`` covers the server); every token's time is taken when the scheduler emits it.

Per run: throughput (completed requests and output tokens per second, first arrival to last completion),
time to first token and time per output token (first to last token, p50 and p99), request latency (p50), and
the token positions the model computed per request (prompt, padding and rows that had already finished).
Ratios are continuous ÷ batch for each A-B pair, reported as the median with the range over the pairs.
RESULT: the ratios at the 1× rate (the batch scheduler's saturation), and ``cb_vs_batch_capacity`` at the
highest rate (both overloaded: each one's throughput is its capacity). Time it with nothing else running.

With ``--prefix-cache-mb N`` a third scheduler, continuous with its prefix cache on, joins each rate's runs in
the order batch, continuous, cached, cached, continuous, batch (A-B-C-C-B-A: A-B-B-A for the cache too); each
cached run also reports the cache's hit rate (prompts that started after cached blocks ÷ prompts) and the
prompt tokens it did not recompute, the ratios add cached ÷ continuous, and the RESULT line adds
``cache_vs_off_*`` at the 1× rate.

``--capacity R`` skips the capacity measurement and offers the rates as multiples of R: the way to compare two
code versions (each run of this script under its own ``PYTHONPATH``) at the same offered load.
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fanlora.backbone import load_backbone
from fanlora.data.instruct import render
from fanlora.generate import Decoding, prompt_ids
from fanlora.latency.timing import save_random_adapter, spread
from fanlora.serving.continuous import ContinuousScheduler
from fanlora.serving.engine import Engine
from fanlora.serving.jobs import Job
from fanlora.serving.scheduler import BatchScheduler
from fanlora.setting import Setting

PROMPTS = [
    "Write one sentence about the sea.",
    "List three colours.",
    "What is the capital of Italy?",
    "Explain what a policy deductible is, in two sentences, for someone who has never bought insurance.",
    "Translate 'good morning' into French.",
    "Give a short tip for writing tests.",
    "Summarise the plot of a heist film in three lines: a crew, a vault, a betrayal, and an escape by boat.",
    "Name a prime number larger than 50.",
]
TENANTS = ["tenant-a", "tenant-b", "tenant-c", "tenant-d", None]


class Timed(Job):
    """A job that notes when its first token and its end come (emit runs in the scheduler's thread)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, loop=None, **kwargs)
        self.first: float | None = None
        self.last: float | None = None  # the last token's time (the batch path ends every row at the batch's end)
        self.end: float | None = None
        self.done = threading.Event()

    def emit(self, kind, value):
        now = time.perf_counter()
        if kind == "text":
            self.first = self.first or now
            self.last = now
        elif kind in ("done", "error"):
            self.first = self.first or now
            self.last = self.last or now
            self.end = now
            self.done.set()


def stream(engine: Engine, n: int, rate: float, seed: int) -> list[tuple[float, list[int], str | None, int]]:
    """(arrival offset s, prompt ids, tenant, max_tokens) for n requests; the same for every scheduler."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate) if rate > 0 else 0.0
        text = render(engine.tokenizer, [{"role": "user", "content": rng.choice(PROMPTS)}], generation_prompt=True)
        out.append((t, prompt_ids(engine.tokenizer, text), rng.choice(TENANTS), rng.randint(8, 48)))
    return out


def play(engine: Engine, scheduler, requests) -> dict[str, float]:
    """Submit each request at its arrival time; wait for all; the run's throughput and latency figures, and
    the token positions the model computed per request (padding and finished rows included)."""
    computed = [0]

    def count(module, args, kwargs):
        computed[0] += kwargs["input_ids"].numel() if "input_ids" in kwargs else args[0].numel()

    hook = engine.model.register_forward_pre_hook(count, with_kwargs=True)
    cache = getattr(scheduler, "prefix", None)
    before = (cache.hits, cache.lookups, cache.tokens_reused) if cache else None
    jobs, start = [], time.perf_counter()
    for offset, ids, tenant, max_tokens in requests:
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        job = Timed(ids, tenant, Decoding(), max_tokens, [], slot=engine.table.acquire(tenant))
        job.arrived = time.perf_counter()
        scheduler.submit(job)
        jobs.append(job)
    for job in jobs:
        job.done.wait(600)
    hook.remove()
    wall = max(j.end for j in jobs) - start
    ttft = [j.first - j.arrived for j in jobs]
    tpot = [(j.last - j.first) / (len(j.tokens) - 1) for j in jobs if len(j.tokens) > 1]
    e2e = [j.end - j.arrived for j in jobs]
    q = lambda xs, p: float(np.percentile(xs, p))  # noqa: E731
    extra = {}
    if cache:
        now = (cache.hits, cache.lookups, cache.tokens_reused)
        hits, lookups, reused = (a - b for a, b in zip(now, before, strict=True))
        extra = {"hit_rate": hits / max(lookups, 1), "reused": reused / len(jobs)}
    return extra | {
        "rps": len(jobs) / wall,
        "tok_s": sum(len(j.tokens) for j in jobs) / wall,
        "ttft_p50": q(ttft, 50),
        "ttft_p99": q(ttft, 99),
        "tpot_p50": q(tpot, 50),
        "tpot_p99": q(tpot, 99),
        "e2e_p50": q(e2e, 50),
        "positions": computed[0] / len(jobs),
    }


def line(label: str, m: dict[str, float]) -> str:
    return (
        f"{label:<28} {m['rps']:6.2f} req/s {m['tok_s']:7.1f} tok/s  ttft p50 {m['ttft_p50']:6.2f} s "
        f"p99 {m['ttft_p99']:6.2f} s  tpot p50 {1000 * m['tpot_p50']:6.1f} ms p99 {1000 * m['tpot_p99']:6.1f} ms  "
        f"e2e p50 {m['e2e_p50']:6.2f} s  positions/request {m['positions']:5.1f}"
        + (f"  hit rate {m['hit_rate']:.2f}, {m['reused']:.1f} tokens reused/request" if "hit_rate" in m else "")
    )


def ratios(pairs: list[tuple[dict, dict]], key: str) -> tuple[float, float, float]:
    """second ÷ first per pair (continuous ÷ batch, cached ÷ continuous): median, min, max."""
    r = spread([c[key] / b[key] for b, c in pairs])
    return r["median"], r["min"], r["max"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True)
    parser.add_argument("--rates", default="0.5,1,2", help="multiples of the batch scheduler's capacity")
    parser.add_argument("--requests", type=int, default=48, help="requests per run")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix-cache-mb", type=float, default=0.0, help="also run continuous with its prefix cache")
    parser.add_argument(
        "--capacity", type=float, help="take this as the batch capacity (req/s) instead of measuring it"
    )
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args()

    setting = Setting.read(args.setting)
    source = setting.backbone.get("source", "embedded")
    work = Path(tempfile.mkdtemp(prefix="fanlora-cb-"))
    engine = Engine.from_backbone(load_backbone(source), setting)
    for i, name in enumerate(TENANTS[:-1]):
        engine.load(name, save_random_adapter(source, setting, work / name, seed=i))
    schedulers = {
        "batch": BatchScheduler(engine, max_queue=10_000, max_batch=args.max_batch),
        "continuous": ContinuousScheduler(engine, max_queue=10_000, max_batch=args.max_batch),
    }
    if args.prefix_cache_mb > 0:
        schedulers["cached"] = ContinuousScheduler(
            engine, max_queue=10_000, max_batch=args.max_batch, prefix_cache_mb=args.prefix_cache_mb
        )
    names = list(schedulers)
    report: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    for scheduler in schedulers.values():  # warm-up, untimed
        play(engine, scheduler, stream(engine, 4, 0, args.seed + 99))
    if args.capacity:  # the same offered rates for runs that are compared across processes (code versions)
        capacity = args.capacity
        say(f"batch scheduler capacity taken as {capacity:.2f} req/s (--capacity)")
    else:
        cap = play(engine, schedulers["batch"], stream(engine, args.requests, 0, args.seed))
        capacity = cap["rps"]
        say(f"batch scheduler capacity (all {args.requests} requests queued at once): {capacity:.2f} req/s")
        say(line("  batch, closed loop", cap))
    keys = ("rps", "tok_s", "ttft_p50", "ttft_p99", "tpot_p50", "e2e_p50", "positions")
    results = {}
    for mult in [float(x) for x in args.rates.split(",")]:
        requests = stream(engine, args.requests, mult * capacity, args.seed + 1)
        runs = {name: [] for name in names}
        for name in names + names[::-1]:  # A-B-B-A (A-B-C-C-B-A)
            runs[name].append(play(engine, schedulers[name], requests))
        say(f"rate {mult:g}x = {mult * capacity:.2f} req/s (Poisson, {args.requests} requests, seed {args.seed + 1})")
        for name, ms in runs.items():
            for i, m in enumerate(ms):
                say(line(f"  {name} #{i + 1}", m))
        results[mult] = {}
        for a, b in itertools.pairwise(names):
            pairs = list(zip(runs[a], runs[b], strict=True))
            got = results[mult][b] = {k: ratios(pairs, k) for k in keys}
            say(f"  {b} / {a}: " + ", ".join(f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in got.items()))
    one, top = results.get(1.0) or results[min(results)], results[max(results)]
    cb, cb_top = one["continuous"], top["continuous"]
    result = (
        f"RESULT cb_vs_batch_throughput={cb['rps'][0]:.3f} cb_vs_batch_ttft_p50={cb['ttft_p50'][0]:.3f} "
        f"cb_vs_batch_tpot_p50={cb['tpot_p50'][0]:.3f} cb_vs_batch_capacity={cb_top['rps'][0]:.3f} "
        f"batch_capacity_rps={capacity:.2f}"
    )
    if "cached" in one:
        c = one["cached"]
        result += (
            f" cache_vs_off_throughput={c['rps'][0]:.3f} cache_vs_off_ttft_p50={c['ttft_p50'][0]:.3f}"
            f" cache_vs_off_positions={c['positions'][0]:.3f}"
        )
    say(result)
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")
    for scheduler in schedulers.values():  # workers end before the interpreter (none is inside a forward)
        scheduler.stop()
        if isinstance(scheduler, ContinuousScheduler):  # the batch worker blocks on its queue: a daemon, left
            scheduler.thread.join(5)


if __name__ == "__main__":
    main()
