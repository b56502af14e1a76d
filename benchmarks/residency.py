"""Many tenants, few slots: Zipf traffic over 1,000 adapters with ``--max-loras 16`` against the same load over
16 adapters that all stay resident, in one balanced run, and the server's memory against its configured bounds.

    python benchmarks/residency.py --setting results/decisive/settings/ab.json --out benchmarks/results/residency.txt

``--adapters`` random r=12 adapters on the setting's modules are written from one template (distinct random
factors each, the folder layout `fanlora finetune` writes). Two `fanlora serve` processes stay up for the whole
run, both ``--max-loras 16 --max-cpu-loras 32 --kv-cache-mb 256``: **resident** gets a closed loop of ``--clients``
clients over 16 adapters (after a warm-up every one stays loaded); **zipf** the same loop over a sequence drawn
from a Zipf law (exponent ``--zipf``) over all the adapters, so most requests hit a few popular tenants and the
tail forces loads and evictions. Every arm is visited twice a round, in a shuffled order and its reverse.

Prints the throughput ratio zipf ÷ resident (goal ≥ 0.8) with a 95 % t-interval over rounds, the zipf server's
loads and evictions (from /metrics), and its RSS against its bounds (goal: within 10 %): the RSS after the same
closed loop on the bare backbone, plus the KV bound, the prefix cache, the host cache and the slots.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil
import torch
from peer import serving
from safetensors.torch import load_file, save_file

from fanlora.latency.loadgen import closed_loop as load
from fanlora.latency.timing import balanced_rounds, per_round_ratios, ratio_interval, save_random_adapter
from fanlora.setting import Setting

FLAGS = ["--max-loras", "16", "--max-cpu-loras", "32", "--kv-cache-mb", "256"]


def write_adapters(setting: Setting, root: Path, n: int) -> int:
    """``n`` adapter folders with distinct random factors from one template; bytes of one weights file."""
    template = save_random_adapter(setting.backbone.get("source", "embedded"), setting, root / "t-0000", seed=0)
    tensors = load_file(template / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(1)
    for i in range(1, n):
        out = root / f"t-{i:04d}"
        out.mkdir()
        for name in ("adapter_config.json", "setting.json"):
            (out / name).write_bytes((template / name).read_bytes())
        save_file({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in tensors.items()},
                  out / "adapter_model.safetensors")  # fmt: skip
    return (template / "adapter_model.safetensors").stat().st_size


def metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def server_rss(url: str) -> float:
    """RSS in MiB of the process listening on ``url``'s port."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return psutil.Process(conn.pid).memory_info().rss / 2**20
    raise SystemExit(f"no process listens on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.adapters < 17 or args.rounds < 2 or args.zipf <= 0:
        parser.error("--adapters ≥ 17, --rounds ≥ 2, --zipf > 0")
    setting = Setting.read(args.setting)
    root = Path(tempfile.mkdtemp(prefix="fanlora-residency-"))
    size = write_adapters(setting, root, args.adapters)
    names = sorted(p.name for p in root.iterdir())
    rng = random.Random(0)
    weights = [1 / (k + 1) ** args.zipf for k in range(len(names))]
    zipf = rng.choices(names, weights, k=20000)
    report: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    top = sum(zipf.count(n) for n in names[:16]) / len(zipf)
    say(f"{args.adapters} adapters of {size / 2**20:.2f} MiB; zipf {args.zipf}: {len(set(zipf))} distinct of "
        f"{len(zipf)} requests drawn, the top 16 carry {top:.0%}")  # fmt: skip
    body = {"ignore_eos": True}
    fan = [sys.executable, "-m", "fanlora", "serve", "--setting", args.setting, "--adapter-dir", str(root), *FLAGS]
    with contextlib.ExitStack() as stack:
        urls = {arm: stack.enter_context(serving(fan)) for arm in ("resident", "zipf")}
        load(urls["resident"], names[:16], args.clients, 8, body)  # every resident adapter loaded
        load(urls["zipf"], ["base"], args.clients, 5, body)  # the same load on the bare backbone: working memory
        base_rss = server_rss(urls["zipf"])
        offset = [0]

        def arm(name: str, models: list[str]):
            def visit() -> float:
                seq = models
                if name == "zipf":  # every visit further along the drawn sequence: the tail keeps arriving
                    offset[0] += 1000
                    seq = models[offset[0] % len(models) :] + models[: offset[0] % len(models)]
                load(urls[name], seq, args.clients, args.warmup, body)
                m = load(urls[name], seq[500:] + seq[:500], args.clients, args.seconds, body)
                say(f"{name:<9} {m['requests']:4d} req, {m['errors']} errors, {m['rps']:5.2f} req/s, "
                    f"p50 {m['p50']:.2f} s, p99 {m['p99']:.2f} s")  # fmt: skip
                return 1 / m["rps"] if m["rps"] else float("inf")

            return visit

        times = balanced_rounds({"resident": arm("resident", names[:16]), "zipf": arm("zipf", zipf)}, args.rounds)
        m = metrics(urls["zipf"])
        rss = server_rss(urls["zipf"])
    r = [1 / x for x in per_round_ratios(times, "zipf", "resident")]
    ci = ratio_interval(r)
    # + the KV bound, the prefix cache's default 64 MiB, and adapters: 32 parsed in host memory, 18 slots (16,
    # slot 0 and a spare) held twice (the stacks and their side-by-side copy for the mixed path)
    bound = base_rss + 256 + 64 + (32 + 2 * 18) * size / 2**20
    say(f"throughput zipf / resident: {ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] (per round "
        f"{', '.join(f'{x:.3f}' for x in r)})")  # fmt: skip
    say(
        f"zipf server: {m.get('fanlora_adapter_loads_total', 0):.0f} loads, "
        f"{m.get('fanlora_adapter_evictions_total', 0):.0f} evictions, "
        f"{m.get('fanlora_adapters_resident', 0):.0f} resident, {m.get('fanlora_adapters_host', 0):.0f} in host memory"
    )
    say(f"RSS {rss:.0f} MiB; bound = RSS after {args.clients} clients on base {base_rss:.0f} + KV 256 + prefix "
        f"cache 64 + (host 32 + 2 x 18 slots) x {size / 2**20:.2f} MiB = {bound:.0f} MiB")  # fmt: skip
    say(f"RSS / bound: {rss / bound:.3f}")
    say(
        f"RESULT zipf_vs_resident_throughput={ci['mean']:.3f} rss_vs_bound={rss / bound:.3f} "
        f"evictions={m.get('fanlora_adapter_evictions_total', 0):.0f} rounds={args.rounds}"
    )
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
