"""`fanlora serve` beside a CPU-bound neighbour, one thread against two, in one balanced run.

    python benchmarks/neighbour.py --setting results/decisive/settings/ab.json --out benchmarks/results/neighbour.txt

Three servers stay up for the whole run, on the same embedded backbone and four random r=12 adapters:
``--threads 1`` (t1: serve's default since 2026-12-07) and ``--threads 2`` (t2: the default before, the host's
two cores), both with libgomp's default waiting (spin, then sleep), and ``--threads 2`` with
``OMP_WAIT_POLICY=PASSIVE`` (t2p: OpenMP threads sleep between parallel regions instead of spinning), and
``--threads auto`` (ta: the team follows the CPUs other processes leave, fanlora/serving/team.py); ``--servers``
picks them (default t1, t2, ta). Arms, per server:

* **stream** — one client, greedy chat completions of 16 tokens (``ignore_eos``) on one adapter, back to back:
  seconds per generated token (wall time ÷ tokens, the short prompt's prefill included) — what one user feels;
  measured idle and beside each neighbour;
* **peer** — ``--clients`` closed-loop clients over the four adapters (as ``benchmarks/peer.py``): seconds per
  request, idle only — the clean-room throughput a second thread may buy.

Neighbours, each a process this benchmark starts before a visit and stops after it (and which stops itself after
``--neighbour-limit`` seconds whatever happens): ``python`` (a pure-Python busy loop), ``torch2`` (a two-thread
torch matmul loop), ``train1`` (a one-thread torch training loop: forward, backward and an optimizer step of a
small MLP). A visit waits until the neighbour says it is running, then runs ``--warmup`` untimed and
``--seconds`` timed seconds of its load.

Every arm is visited twice a round, in a shuffled order and its reverse (``balanced_rounds``); ratios are taken
within a round and summarised over rounds (geometric mean, 95 % t-interval). Printed: per-token latency beside
each neighbour ÷ idle, for each thread count (the goal: ≤ 1.25), one thread ÷ two (stream, per neighbour), and
peer throughput one thread ÷ two. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from peer import ADAPTERS, serving

from fanlora.latency.loadgen import closed_loop as load
from fanlora.latency.timing import balanced_rounds, per_round_ratios, ratio_interval, save_random_adapter
from fanlora.setting import Setting

NEIGHBOURS = {  # name → (set-up, one step of the busy loop)
    "python": ("x = 0", "x += 1"),
    "torch2": ("import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)", "a = torch.tanh(a @ a)"),
    "train1": (
        "import torch\ntorch.set_num_threads(1)\nnet = torch.nn.Sequential(torch.nn.Linear(512, 2048), "
        "torch.nn.GELU(), torch.nn.Linear(2048, 512))\nopt = torch.optim.AdamW(net.parameters())\n"
        "x = torch.randn(64, 512)",
        "loss = net(x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()",
    ),
}


#: (tag, --threads, OMP_WAIT_POLICY: "" is libgomp's default — spin, then sleep; libgomp warns about the empty
#: value and keeps its default — and "PASSIVE" makes idle team threads sleep)
SERVERS = [("t1", 1, ""), ("t2", 2, ""), ("t2p", 2, "PASSIVE"), ("ta", "auto", "")]


@contextlib.contextmanager
def wait_policy(policy: str | None):
    saved = os.environ.get("OMP_WAIT_POLICY")
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy
    try:
        yield
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)
        if saved is not None:
            os.environ["OMP_WAIT_POLICY"] = saved


@contextlib.contextmanager
def neighbour(kind: str | None, limit: float):
    """A CPU-bound process beside the server for the block (None: none); it ends itself after ``limit`` s."""
    if kind is None:
        yield
        return
    setup, step = NEIGHBOURS[kind]
    code = f"import time\n{setup}\nend = time.time() + {limit}\nprint('running', flush=True)\n"
    code += f"while time.time() < end:\n    {step}\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "running", f"neighbour {kind} failed"
        yield
    finally:
        proc.kill()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8, help="timed seconds per visit")
    parser.add_argument("--warmup", type=float, default=2, help="untimed seconds before each visit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--neighbour-limit", type=float, default=120, help="a neighbour's own deadline, seconds")
    parser.add_argument("--servers", default="t1,t2,ta", help="which of t1, t2, t2p, ta (--threads auto) to run")
    parser.add_argument("--out")
    args = parser.parse_args()
    servers = [s for s in SERVERS if s[0] in args.servers.split(",")]
    if args.rounds < 2 or args.clients < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--rounds must be ≥ 2, --clients ≥ 1, --seconds > 0 and --warmup ≥ 0")
    setting = Setting.read(args.setting)
    work = Path(tempfile.mkdtemp(prefix="fanlora-neighbour-"))
    for i, name in enumerate(ADAPTERS):
        save_random_adapter(setting.backbone.get("source", "embedded"), setting, work / name, seed=i)
    report: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    body = {"ignore_eos": True}

    def arm(label: str, url: str, clients: int, models: list[str], near: str | None) -> Callable[[], float]:
        def visit() -> float:
            with neighbour(near, args.neighbour_limit):
                load(url, models, clients, args.warmup, body)
                m = load(url, models, clients, args.seconds, body)
            say(f"{label:<34} {m['requests']:4d} req, {m['errors']} errors, {m['tok_s']:6.1f} tok/s, "
                f"p50 {m['p50']:.2f} s, p99 {m['p99']:.2f} s")  # fmt: skip
            errors.append(m["errors"])
            per = (1 / m["tok_s"]) if clients == 1 else (1 / m["rps"])
            return per if m["requests"] else float("inf")

        return visit

    fan = [sys.executable, "-m", "fanlora", "serve", "--setting", args.setting, "--adapter-dir", str(work)]
    errors: list[int] = []
    arms: dict[str, Callable[[], float]] = {}
    with contextlib.ExitStack() as stack:
        for t, threads, policy in servers:
            with wait_policy(policy):  # read by libgomp when the server starts
                url = stack.enter_context(serving([*fan, "--threads", str(threads)]))
            load(url, ADAPTERS, 1, 6, body)  # loads every adapter
            for near in (None, *NEIGHBOURS):
                label = f"{t} stream {near or 'idle'}"
                arms[label] = arm(label, url, 1, ADAPTERS[:1], near)
            arms[f"{t} peer idle"] = arm(f"{t} peer idle", url, args.clients, ADAPTERS, None)
        times = balanced_rounds(arms, args.rounds, on_round=lambda r: say(f"round {r + 1}/{args.rounds} done"))
    say(summarise(times, [t for t, _, _ in servers]) + f" errors={sum(errors)} rounds={args.rounds}")
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


def summarise(times: dict[str, list[float]], tags: list[str]) -> str:
    result = {}

    def show(key: str, label: str, num: str, den: str, invert: bool = False) -> None:
        r = per_round_ratios(times, num, den)
        r = [1 / x for x in r] if invert else r
        ci = ratio_interval(r)
        rounds = ", ".join(f"{x:.3f}" for x in r)
        lines.append(f"{label}: {ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] (per round {rounds})")
        result[key] = ci["mean"]

    lines: list[str] = []
    for t in tags:
        for near in NEIGHBOURS:
            show(f"{t}_{near}_vs_idle", f"{t}: seconds per token beside {near} / idle",
                 f"{t} stream {near}", f"{t} stream idle")  # fmt: skip
    for one, other in [(a, b) for a in ("t1", "ta") for b in ("t2", "t2p") if a in tags and b in tags]:
        for near in ("idle", *NEIGHBOURS):
            show(f"stream_{near}_{one}_vs_{other}", f"stream {near}: seconds per token, {one} / {other}",
                 f"{one} stream {near}", f"{other} stream {near}")  # fmt: skip
        show(f"peer_throughput_{one}_vs_{other}", f"peer load (idle): throughput, {one} / {other}", f"{one} peer idle",
             f"{other} peer idle", invert=True)  # fmt: skip
    return "\n".join(lines) + "\nRESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items())


if __name__ == "__main__":
    main()
