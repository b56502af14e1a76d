"""`fanlora serve` against `transformers serve --continuous-batching` on the same backbone, closed loop, one run.

    python benchmarks/peer.py --setting runs/demo/setting.json --out benchmarks/results/peer.txt

Both servers run as subprocesses on loopback over the embedded backbone (the de-quantised folder in fanlora's
cache, the same weights). Each measurement: ``--clients`` threads send chat completions back to back for
``--seconds`` seconds (greedy, ``max_tokens`` 16, six fixed prompts) through the ``openai`` client, after an
untimed warm-up. Order, A-B-B-A: transformers (base), fanlora (base), fanlora (every request on a different
adapter: each client cycles through four random r=12 adapters), then the same three in reverse. transformers'
server has no per-request LoRA, so only the base row compares like with like; the adapter row says what the
adapters cost fanlora. Prints requests/s, completion tokens/s and latency percentiles per run, the ratios
fanlora ÷ transformers per pair, and a RESULT line. Time it with nothing else running.

With ``--prefix-cache-mb N`` fanlora also runs with its prefix cache on, the order then being transformers,
fanlora (off), fanlora (on), fanlora (on), fanlora (off), transformers — A-B-B-A for the cache too — and the
RESULT line adds the cache's throughput ratio (on ÷ off, per pair) for base and for the four adapters.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fanlora.backbone import resolve_source
from fanlora.latency.loadgen import closed_loop as load
from fanlora.latency.timing import save_random_adapter
from fanlora.setting import Setting

ADAPTERS = ["tenant-a", "tenant-b", "tenant-c", "tenant-d"]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--prefix-cache-mb", type=float, default=0.0, help="also run fanlora with its prefix cache")
    parser.add_argument("--out")
    args = parser.parse_args()
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
            load(url, [model_dir], 1, 8)  # warm-up
            return [
                ("transformers serve --continuous-batching, base", load(url, [model_dir], args.clients, args.seconds))
            ]
        finally:
            proc.terminate()
            proc.wait(30)

    def ours(cache_mb: float = 0.0) -> list[tuple[str, dict]]:
        port = free_port()
        cmd = [sys.executable, "-m", "fanlora", "serve", "--setting", args.setting, "--adapter-dir", str(work)]
        cmd += ["--prefix-cache-mb", str(cache_mb)]
        proc = start([*cmd, "--port", str(port)], port)
        tag = f" (prefix cache {cache_mb:g} MiB)" if cache_mb else ""
        try:
            url = f"http://127.0.0.1:{port}/v1"
            load(url, ["base", *ADAPTERS], 1, 8)  # warm-up, loads every adapter
            base = load(url, ["base"], args.clients, args.seconds)
            mixed = load(url, ADAPTERS, args.clients, args.seconds)
            return [(f"fanlora serve, base{tag}", base), (f"fanlora serve, 4 adapters{tag}", mixed)]
        finally:
            proc.terminate()
            proc.wait(30)

    runs: dict[str, list[dict]] = {}
    cached = lambda: ours(args.prefix_cache_mb)  # noqa: E731
    order = (peer, ours, cached, cached, ours, peer) if args.prefix_cache_mb else (peer, ours, ours, peer)
    for fn in order:  # A-B-B-A
        for label, m in fn():
            runs.setdefault(label, []).append(m)
            say(
                f"{label:<50} {m['requests']:4d} req, {m['errors']} errors, {m['rps']:5.2f} req/s, "
                f"{m['tok_s']:6.1f} tok/s, p50 {m['p50']:.2f} s, p99 {m['p99']:.2f} s"
            )
    (peer_label,) = [k for k in runs if k.startswith("transformers")]
    for label in [k for k in runs if k.startswith("fanlora")]:
        r = [m["rps"] / p["rps"] for m, p in zip(runs[label], runs[peer_label], strict=True)]
        lat = [m["p50"] / p["p50"] for m, p in zip(runs[label], runs[peer_label], strict=True)]
        say(
            f"{label} / transformers: throughput {statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}], "
            f"p50 latency {statistics.median(lat):.3f} [{min(lat):.3f}, {max(lat):.3f}]"
        )
    ratio = lambda label: statistics.median(  # noqa: E731
        m["rps"] / p["rps"] for m, p in zip(runs[label], runs[peer_label], strict=True)
    )
    errors = sum(m["errors"] for ms in runs.values() for m in ms)
    cache = ""
    if args.prefix_cache_mb:
        tag = f" (prefix cache {args.prefix_cache_mb:g} MiB)"
        for what in ("base", "4 adapters"):
            on, off = runs[f"fanlora serve, {what}{tag}"], runs[f"fanlora serve, {what}"]
            r = [a["rps"] / b["rps"] for a, b in zip(on, off, strict=True)]
            say(f"fanlora serve, {what}: prefix cache on / off: throughput {statistics.median(r):.3f} "
                f"[{min(r):.3f}, {max(r):.3f}]")  # fmt: skip
            cache += f" {what.replace(' ', '_')}_cache_vs_off={statistics.median(r):.3f}"
    say(
        f"RESULT base_vs_peer_throughput={ratio('fanlora serve, base'):.3f} "
        f"adapters_vs_peer_throughput={ratio('fanlora serve, 4 adapters'):.3f}{cache} errors={errors}"
    )
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
