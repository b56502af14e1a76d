"""`fanlora serve` on any backbone shape with many random adapters under closed-loop load, one run.

    python benchmarks/shape_serve.py --backbone shape:llama-2-7b --dtype bfloat16 --device cuda \
        --setting results/decisive/settings/ab.json --adapters 16 --out shape-serve.txt

The question a 7B deployment asks before any weights are downloaded: what do many distinct adapters cost a
server, against one adapter and against the bare backbone? The setting (made on a real model) is mapped onto
the backbone by layer fraction (:meth:`fanlora.setting.Setting.fitted_to`) when the backbone is a ``shape:``
one; ``--adapters`` random r=12 adapters are made for it; one ``fanlora serve`` runs as a subprocess on loopback
(its log in ``--log``). The loads ("arms"): every request on ``base``; every request on one adapter; each client
cycling through all the adapters (so nearly every batch mixes distinct adapters). Each visit runs ``--clients``
threads of greedy chat completions (``max_tokens`` 16, ``ignore_eos``: equal work per request) for
``--warmup`` untimed seconds, then ``--seconds`` timed ones (:func:`fanlora.latency.loadgen.closed_loop`,
the load `benchmarks/peer.py` uses). ``--rounds`` rounds, each visiting every arm twice in a shuffled order and
its reverse (:func:`fanlora.latency.timing.balanced_rounds`); ratios are taken within a round and summarised
over rounds (median and range; geometric mean with a 95 % t-interval when scipy is installed). Time it with
nothing else running. `scripts/gpu-check.sh` runs it on a lent GPU at the paper's shape.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peer import serving, visitor

from fanlora.backbone import load_backbone
from fanlora.latency.loadgen import closed_loop as load
from fanlora.latency.timing import balanced_rounds, per_round_ratios, save_random_adapter, spread
from fanlora.setting import Setting


def make_adapters(args: argparse.Namespace, work: Path) -> tuple[Path, list[str], str]:
    """(the setting as served, adapter names, a line saying what was mapped), made on this process's copy of
    the backbone, which is then freed before the server loads its own."""
    probe = load_backbone(args.backbone, args.dtype, None, args.device, random_ok=True)
    read = Setting.read(args.setting)
    setting = read.fitted_to(probe)
    served = setting.write(work / "setting.json")
    names = [f"tenant-{i:02d}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        save_random_adapter(probe, setting, work / "adapters" / name, seed=i)
    note = (
        f"setting {args.setting}: {read.n_modules} modules on {read.num_layers} layers"
        + (f", mapped by layer fraction to {setting.n_modules} on {setting.num_layers}" if setting is not read else "")
        + f"; backbone {probe.identity.get('name')}, {args.dtype} on {probe.identity['device']}"
    )
    del probe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return served, names, note


def summarise(times: dict[str, list[float]], arms: list[str], say: Callable[[str], None]) -> str:
    """Throughput ratios within each round, summarised over rounds; the RESULT line."""
    base, one, many = arms
    result = {}
    for num, den, key in ((many, one, "mixed_vs_one"), (one, base, "one_vs_base"), (many, base, "mixed_vs_base")):
        r = [1 / x for x in per_round_ratios(times, num, den)]
        s = spread(r)
        line = f"{num} / {den}: throughput {s['median']:.3f} per round [{s['min']:.3f}, {s['max']:.3f}]"
        with contextlib.suppress(ImportError):  # the interval needs scipy; the per-round figures do not
            from fanlora.latency.timing import ratio_interval

            ci = ratio_interval(r)
            line += f"; geometric mean {ci['mean']:.3f}, 95 % CI [{ci['low']:.3f}, {ci['high']:.3f}]"
        say(line)
        result[key] = s["median"]
    return "RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True, help="a real run's setting.json (mapped onto a shape)")
    parser.add_argument("--backbone", default="shape:qwen2.5-0.5b", help="shape:NAME, or a real backbone")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10, help="timed seconds per visit")
    parser.add_argument("--warmup", type=float, default=2, help="untimed seconds of the same load before each visit")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each visits every arm twice (ABBA)")
    parser.add_argument("--log", help="the server's stdout and stderr (default: discarded)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if min(args.adapters, args.clients, args.rounds) < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--adapters, --clients and --rounds must be ≥ 1, --seconds > 0, --warmup ≥ 0")
    report: list[str] = [f"$ python benchmarks/shape_serve.py {' '.join(sys.argv[1:] if argv is None else argv)}"]

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    work = Path(tempfile.mkdtemp(prefix="fanlora-shape-serve-"))
    served, names, note = make_adapters(args, work)
    say(note)
    cmd = [sys.executable, "-m", "fanlora", "serve", "--setting", str(served), "--adapter-dir", str(work / "adapters")]
    cmd += ["--backbone", args.backbone, "--dtype", args.dtype, "--device", args.device]
    body = {"ignore_eos": True}
    labels = ["base", "one adapter", f"{args.adapters} distinct adapters"]
    errors: list[int] = []

    def arm(label: str, url: str, models: list[str]) -> Callable[[], float]:
        return visitor(label, url, models, body, args, say, errors)

    with serving(cmd, log=args.log) as url:
        load(url, ["base", *names], len(names) + 1, 4, body)  # warm-up: client i starts on model i, so all load
        arms = {labels[0]: arm(labels[0], url, ["base"]), labels[1]: arm(labels[1], url, names[:1])}
        arms[labels[2]] = arm(labels[2], url, names)
        times = balanced_rounds(arms, args.rounds, on_round=lambda r: say(f"round {r + 1}/{args.rounds} done"))
    say(summarise(times, labels, say) + f" errors={sum(errors)} rounds={args.rounds} clients={args.clients}")
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
