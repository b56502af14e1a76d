"""`fanlora serve` against `transformers serve --continuous-batching` on the same backbone, closed loop, one run.

    python benchmarks/peer.py --setting runs/demo/setting.json --prefix-cache-mb 64 --out peer-rounds.txt

Every server runs as a subprocess on loopback over the embedded backbone (the de-quantised folder in fanlora's
cache, the same weights), and all of them stay up for the whole run: transformers' server, fanlora's without
its prefix cache and, with ``--prefix-cache-mb N``, fanlora's with it (an idle server takes no CPU; each holds
its own copy of the weights). The loads ("arms"): transformers (base); for each fanlora server, base and every
request on a different adapter (each client cycles through four random r=12 adapters). One visit of an arm:
``--clients`` threads send chat completions back to back (greedy, ``max_tokens`` 16, six fixed prompts) through
the ``openai`` client for ``--warmup`` untimed seconds, then ``--seconds`` timed ones. ``--rounds`` rounds, each
visiting every arm twice — a shuffled order, then its reverse (:func:`fanlora.latency.timing.balanced_rounds`,
ABBA generalised) — so a drift of the machine's speed weighs on every arm alike; ratios are taken within a
round (the mean of its two visits per arm) and summarised over rounds: per-round median and range, and the
geometric mean with a 95 % t-interval over rounds (:func:`fanlora.latency.timing.ratio_interval`; the rounds
are the independent units). Six fixed prompts make every prompt a prefix-cache hit once warm — more than varied
chat traffic would give, where the chat template's system block is what repeats.

transformers' server has no per-request LoRA, so only the base arm compares like with like; the adapter arms
say what the adapters cost fanlora. Prints requests/s, completion tokens/s and latency percentiles per visit,
the ratios fanlora ÷ transformers, 4 adapters ÷ base (same server) and cache on ÷ off, and a RESULT line.
Time it with nothing else running.

Equal work per request (``--equal-work``, the default): every answer is ``max_tokens`` long — fanlora is sent
``"ignore_eos": true`` (vLLM's extension), transformers' server a ``generation_config`` whose EOS is a token
these prompts never reach (it has no ``ignore_eos``). Without it, answers end at EOS: the four random adapters
answer these prompts with ~2 % more tokens than the bare backbone (14.9 against 14.6 per request in
results/peer-prefix-cache.txt), so requests per second would charge the adapters for longer answers.
``--no-equal-work`` gives that load.

``--before TREE`` (repeatable) also serves from an older checkout (``git worktree add /tmp/old <commit>``) with
the same flags, so a change's cost is measured side by side in the same rounds: "this tree ÷ @commit".

Until 2026-12-04 this benchmark restarted a server for each visit and made six 30-second visits in all (one
A-B-B-A): two ratios per comparison, which on this machine's drifting speed disagreed by up to 0.09
(results/peer-equal-work.txt). Keeping the servers up makes short visits, and so many rounds, affordable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from fanlora.backbone import resolve_source
from fanlora.latency.loadgen import closed_loop as load
from fanlora.latency.timing import balanced_rounds, per_round_ratios, ratio_interval, save_random_adapter, spread
from fanlora.setting import Setting

ADAPTERS = ["tenant-a", "tenant-b", "tenant-c", "tenant-d"]
NEVER = 49151  # the embedded backbone's last vocabulary id: transformers' stand-in EOS under --equal-work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    cmd: list[str], port: int, new_session: bool = False, env: dict | None = None, log: str | None = None
) -> subprocess.Popen:
    """Start a server; wait for its /health. ``log``: a file for its stdout and stderr (default: discarded)."""
    sink = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (the child holds it for its lifetime)
    proc = subprocess.Popen(
        cmd, stdout=sink, stderr=subprocess.STDOUT if log else subprocess.DEVNULL, env={**os.environ, **(env or {})},
        start_new_session=new_session,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                why = f"see {log}" if log else "run it by hand to see why"
                raise SystemExit(f"{cmd[0]} exited with {proc.returncode}: {why}") from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{' '.join(cmd[:2])} did not answer /health within 300 s")


@contextlib.contextmanager
def serving(cmd: list[str], env: dict | None = None, log: str | None = None) -> Iterator[str]:
    """Start a server on a free loopback port; yield its OpenAI base URL; stop it."""
    port = free_port()
    proc = start([*cmd, "--host", "127.0.0.1", "--port", str(port)], port, env=env, log=log)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


def visitor(
    label: str, url: str, models: list[str], body: dict | None, args: argparse.Namespace, say, errors: list[int]
) -> Callable[[], float]:
    """One visit of an arm: ``args.warmup`` untimed seconds of the load, then ``args.seconds`` timed ones with
    ``args.clients`` clients; says the visit's figures, counts its errors, returns seconds per request."""

    def visit() -> float:
        load(url, models, args.clients, args.warmup, body)  # untimed: the same load, steady state
        m = load(url, models, args.clients, args.seconds, body)
        errors.append(m["errors"])
        say(f"{label:<50} {m['requests']:4d} req, {m['errors']} errors, {m['rps']:6.2f} req/s, "
            f"{m['tok_s']:7.1f} tok/s, p50 {m['p50']:.2f} s, p99 {m['p99']:.2f} s")  # fmt: skip
        return 1 / m["rps"] if m["rps"] else float("inf")

    return visit


def summarise(times: dict[str, list[float]], peer: str, cache_tag: str, say, before: list[str] = ()) -> str:
    """Throughput ratios within each round (seconds per request of the denominator ÷ of the numerator) —
    fanlora ÷ transformers, 4 adapters ÷ base in the same server, cache on ÷ off — and the RESULT line."""

    def ratio(num: str, den: str) -> dict[str, float]:
        r = [1 / x for x in per_round_ratios(times, num, den)]
        return spread(r) | ratio_interval(r)

    def fmt(r: dict[str, float]) -> str:
        return (f"{r['median']:.3f} per round [{r['min']:.3f}, {r['max']:.3f}]; geometric mean {r['mean']:.3f}, "
                f"95 % CI [{r['low']:.3f}, {r['high']:.3f}]")  # fmt: skip

    result = {}
    tags = {"": ""} | ({"cached_": cache_tag} if cache_tag else {})
    for prefix, tag in tags.items():
        base, mixed = f"fanlora serve, base{tag}", f"fanlora serve, 4 adapters{tag}"
        for label, key in ((base, "base_vs_peer"), (mixed, "adapters_vs_peer")):
            r = ratio(label, peer)
            say(f"{label} / transformers: throughput {fmt(r)}")
            result[f"{prefix}{key}_throughput"] = r
        r = ratio(mixed, base)
        say(f"fanlora serve{tag}: 4 adapters / base: throughput {fmt(r)}")
        result[f"{prefix}adapters_vs_base_throughput"] = r
    if cache_tag:
        for what in ("base", "4 adapters"):
            r = ratio(f"fanlora serve, {what}{cache_tag}", f"fanlora serve, {what}")
            say(f"fanlora serve, {what}: prefix cache on / off: throughput {fmt(r)}")
            result[f"{what.replace(' ', '_')}_cache_vs_off"] = r
    for commit in before:
        for what in ("base", "4 adapters"):
            r = ratio(f"fanlora serve, {what}{cache_tag}", f"fanlora serve @{commit}, {what}{cache_tag}")
            say(f"fanlora serve, {what}{cache_tag}: this tree / {commit}: throughput {fmt(r)}")
            result[f"{what.replace(' ', '_')}_vs_{commit}"] = r
    return "RESULT " + " ".join(f"{k}={v['mean']:.3f}" for k, v in result.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10, help="timed seconds per visit")
    parser.add_argument("--warmup", type=float, default=2, help="untimed seconds of the same load before each visit")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; each visits every arm twice (ABBA)")
    parser.add_argument("--prefix-cache-mb", type=float, default=0.0, help="also run fanlora with its prefix cache")
    parser.add_argument(
        "--equal-work", action=argparse.BooleanOptionalAction, default=True, help="every answer max_tokens long"
    )
    parser.add_argument(
        "--before", action="append", default=[], metavar="TREE",
        help="also serve from this checkout (an older commit's worktree), same flags: this tree ÷ that one",
    )  # fmt: skip
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.rounds < 1 or args.clients < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--rounds and --clients must be ≥ 1, --seconds > 0 and --warmup ≥ 0")
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

    def arm(label: str, url: str, models: list[str], body: dict | None) -> Callable[[], float]:
        return visitor(label, url, models, body, args, say, errors)

    peer = "transformers serve --continuous-batching, base"
    fan = [sys.executable, "-m", "fanlora", "serve", "--setting", args.setting, "--adapter-dir", str(work)]
    cache_tag = f" (prefix cache {args.prefix_cache_mb:g} MiB)" if args.prefix_cache_mb else ""
    errors: list[int] = []
    with contextlib.ExitStack() as stack:
        peer_cmd = ["transformers", "serve", model_dir, "--continuous-batching", "--device", "cpu"]
        url = stack.enter_context(serving(peer_cmd))
        load(url, [model_dir], 1, 8, peer_body)  # warm-up
        arms = {peer: arm(peer, url, [model_dir], peer_body)}
        for tag, mb in [("", 0.0)] + ([(cache_tag, args.prefix_cache_mb)] if cache_tag else []):
            url = stack.enter_context(serving([*fan, "--prefix-cache-mb", str(mb)]))
            load(url, ["base", *ADAPTERS], 1, 8, fan_body)  # warm-up, loads every adapter
            arms[f"fanlora serve, base{tag}"] = arm(f"fanlora serve, base{tag}", url, ["base"], fan_body)
            arms[f"fanlora serve, 4 adapters{tag}"] = arm(f"fanlora serve, 4 adapters{tag}", url, ADAPTERS, fan_body)
        commits = []
        for tree in args.before:  # the same server from an older checkout, with the last fanlora arm's flags
            commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()  # fmt: skip
            commits.append(commit)
            url = stack.enter_context(serving([*fan, "--prefix-cache-mb", str(mb)], env={"PYTHONPATH": tree}))
            load(url, ["base", *ADAPTERS], 1, 8, fan_body)
            for what, models in (("base", ["base"]), ("4 adapters", ADAPTERS)):
                label = f"fanlora serve @{commit}, {what}{tag}"
                arms[label] = arm(label, url, models, fan_body)
        times = balanced_rounds(arms, args.rounds, on_round=lambda r: say(f"round {r + 1}/{args.rounds} done"))
    result = summarise(times, peer, cache_tag, say, commits)
    say(result + f" errors={sum(errors)} rounds={args.rounds}")
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
