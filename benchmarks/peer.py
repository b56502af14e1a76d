"""`fanlora serve` against `transformers serve --continuous-batching` on the same backbone, closed loop, one run.

    python benchmarks/peer.py --setting runs/demo/setting.json --out benchmarks/results/peer.txt

Both servers run as subprocesses on loopback over the embedded backbone (the de-quantised folder in fanlora's
cache, the same weights). Each measurement: ``--clients`` threads send chat completions back to back for
``--seconds`` seconds (greedy, ``max_tokens`` 16, six fixed prompts) through the ``openai`` client, after an
untimed warm-up and ``--warmup`` untimed seconds of the same load (steady state: with the cache on, each
adapter's prompts are cached by then — six fixed prompts make every prompt a hit, more than varied chat traffic
would give, where the chat template's system block is what repeats).
Order, A-B-B-A: transformers (base), fanlora (base), fanlora (every request on a different
adapter: each client cycles through four random r=12 adapters), then the same three in reverse. transformers'
server has no per-request LoRA, so only the base row compares like with like; the adapter row says what the
adapters cost fanlora (each fanlora server runs base then adapters on its first visit, adapters then base on its
second). Prints requests/s, completion tokens/s and latency percentiles per run, the ratios fanlora ÷
transformers and 4 adapters ÷ base (same server) per pair, and a RESULT line. Time it with nothing else running.

Equal work per request (``--equal-work``, the default): every answer is ``max_tokens`` long — fanlora is sent
``"ignore_eos": true`` (vLLM's extension), transformers' server a ``generation_config`` whose EOS is a token
these prompts never reach (it has no ``ignore_eos``). Without it, answers end at EOS: the four random adapters
answer these prompts with ~2 % more tokens than the bare backbone (14.9 against 14.6 per request in
results/peer-prefix-cache.txt),
so requests per second would charge the adapters for longer answers. ``--no-equal-work`` gives the old load.

With ``--prefix-cache-mb N`` fanlora also runs with its prefix cache on, the order then being transformers,
fanlora (off), fanlora (on), fanlora (on), fanlora (off), transformers — A-B-B-A for the cache too — and the
RESULT line adds the cache's throughput ratio (on ÷ off, per pair) for base and for the four adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fanlora.backbone import resolve_source
from fanlora.latency.loadgen import closed_loop as load
from fanlora.latency.timing import save_random_adapter, spread
from fanlora.setting import Setting

ADAPTERS = ["tenant-a", "tenant-b", "tenant-c", "tenant-d"]
NEVER = 49151  # the embedded backbone's last vocabulary id: transformers' stand-in EOS under --equal-work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, new_session: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(), start_new_session=new_session
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[0]} exited with {proc.returncode}: run it by hand to see why") from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{' '.join(cmd[:2])} did not answer /health within 300 s")


def ratios(a: list[dict], b: list[dict], key: str = "rps") -> tuple[float, float, float]:
    """a ÷ b per pair of runs: median, min, max."""
    r = spread([x[key] / y[key] for x, y in zip(a, b, strict=True)])
    return r["median"], r["min"], r["max"]


def summarise(runs: dict[str, list[dict]], cache_mb: float, say) -> None:
    """The ratios per pair — fanlora ÷ transformers, 4 adapters ÷ base in the same server, cache on ÷ off —
    and the RESULT line."""
    (peer,) = [k for k in runs if k.startswith("transformers")]
    fmt = lambda r: f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"  # noqa: E731
    for label in [k for k in runs if k.startswith("fanlora")]:
        say(f"{label} / transformers: throughput {fmt(ratios(runs[label], runs[peer]))}, "
            f"p50 latency {fmt(ratios(runs[label], runs[peer], 'p50'))}")  # fmt: skip
    tags = {"": ""} | ({"cached_": f" (prefix cache {cache_mb:g} MiB)"} if cache_mb else {})
    result = f"RESULT base_vs_peer_throughput={ratios(runs['fanlora serve, base'], runs[peer])[0]:.3f}"
    for prefix, tag in tags.items():
        base, mixed = runs[f"fanlora serve, base{tag}"], runs[f"fanlora serve, 4 adapters{tag}"]
        say(f"fanlora serve{tag}: 4 adapters / base: throughput {fmt(ratios(mixed, base))}")
        result += f" {prefix}adapters_vs_peer_throughput={ratios(mixed, runs[peer])[0]:.3f}"
        result += f" {prefix}adapters_vs_base_throughput={ratios(mixed, base)[0]:.3f}"
    if cache_mb:
        for what in ("base", "4 adapters"):
            r = ratios(runs[f"fanlora serve, {what}{tags['cached_']}"], runs[f"fanlora serve, {what}"])
            say(f"fanlora serve, {what}: prefix cache on / off: throughput {fmt(r)}")
            result += f" {what.replace(' ', '_')}_cache_vs_off={r[0]:.3f}"
    say(result + f" errors={sum(m['errors'] for ms in runs.values() for m in ms)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=5, help="untimed seconds of each timed load before it")
    parser.add_argument("--prefix-cache-mb", type=float, default=0.0, help="also run fanlora with its prefix cache")
    parser.add_argument(
        "--equal-work", action=argparse.BooleanOptionalAction, default=True, help="every answer max_tokens long"
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    fan_body = {"ignore_eos": True} if args.equal_work else None
    gen = {"eos_token_id": NEVER, "max_new_tokens": 16, "do_sample": False}
    peer_body = {"generation_config": json.dumps(gen)} if args.equal_work else None
    setting = Setting.read(args.setting)
    source = setting.backbone.get("source", "embedded")
    model_dir, _ = resolve_source(source)
    work = Path(tempfile.mkdtemp(prefix="fanlora-peer-"))
    for i, name in enumerate(ADAPTERS):
        save_random_adapter(source, setting, work / name, seed=i)
    report: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    def peer() -> list[tuple[str, dict]]:
        port = free_port()
        cmd = ["transformers", "serve", model_dir, "--continuous-batching", "--device", "cpu"]
        proc = start([*cmd, "--host", "127.0.0.1", "--port", str(port)], port)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            load(url, [model_dir], 1, 8, peer_body)  # warm-up
            load(url, [model_dir], args.clients, args.warmup, peer_body)  # the timed load, untimed: steady state
            label = "transformers serve --continuous-batching, base"
            return [(label, load(url, [model_dir], args.clients, args.seconds, peer_body))]
        finally:
            proc.terminate()
            proc.wait(30)

    def timed(url: str, models: list[str]) -> dict:
        load(url, models, args.clients, args.warmup, fan_body)  # untimed: the same load primes caches and pools
        return load(url, models, args.clients, args.seconds, fan_body)

    def ours(cache_mb: float = 0.0, flip: bool = False) -> list[tuple[str, dict]]:
        port = free_port()
        cmd = [sys.executable, "-m", "fanlora", "serve", "--setting", args.setting, "--adapter-dir", str(work)]
        cmd += ["--prefix-cache-mb", str(cache_mb)]
        proc = start([*cmd, "--port", str(port)], port)
        tag = f" (prefix cache {cache_mb:g} MiB)" if cache_mb else ""
        try:
            url = f"http://127.0.0.1:{port}/v1"
            load(url, ["base", *ADAPTERS], 1, 8, fan_body)  # warm-up, loads every adapter
            loads = [(f"fanlora serve, base{tag}", ["base"]), (f"fanlora serve, 4 adapters{tag}", ADAPTERS)]
            return [(label, timed(url, models)) for label, models in loads[:: -1 if flip else 1]]
        finally:
            proc.terminate()
            proc.wait(30)

    runs: dict[str, list[dict]] = {}
    cached = lambda flip=False: ours(args.prefix_cache_mb, flip)  # noqa: E731
    flipped = lambda fn: lambda: fn(flip=True)  # noqa: E731  (the second visit runs adapters before base)
    order = (
        (peer, ours, cached, flipped(cached), flipped(ours), peer)
        if args.prefix_cache_mb
        else (peer, ours, flipped(ours), peer)
    )
    for fn in order:  # A-B-B-A
        for label, m in fn():
            runs.setdefault(label, []).append(m)
            say(
                f"{label:<50} {m['requests']:4d} req, {m['errors']} errors, {m['rps']:5.2f} req/s, "
                f"{m['tok_s']:6.1f} tok/s, p50 {m['p50']:.2f} s, p99 {m['p99']:.2f} s"
            )
    summarise(runs, args.prefix_cache_mb, say)
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
