"""Another tenant's first token behind one tenant's burst of long prompts, against the same request on an idle
server, in one balanced run.

    python benchmarks/burst.py --setting results/decisive/settings/ab.json --out benchmarks/results/burst.txt

One `fanlora serve` (defaults) with two random r=12 adapters stays up for the whole run. Arms, visited in a
shuffled order and its reverse each round (``balanced_rounds``):

* **idle** — tenant B streams a completion of a 4-token prompt; the time to its first token;
* **burst** — tenant A sends ``--burst`` streamed completions of ``--prompt-tokens``-token prompts at once
  (``max_tokens`` 16), and ``--delay`` seconds later tenant B sends the same 4-token request: its time to first
  token; the visit waits for the burst to finish before the next one.

Prints every TTFT, the per-round ratio burst ÷ idle with a 95 % t-interval over rounds, and a RESULT line
(``burst_ttft_s``: the geometric mean TTFT behind the burst; the goal is ≤ 2 s, against 38–41 s when the
prefill budget was spent first come, first served) and the server's RSS after the warm-up and idle after all
bursts (the goal: within 10 %).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
from peer import serving
from residency import server_rss

from fanlora.latency.timing import balanced_rounds, per_round_ratios, ratio_interval, save_random_adapter
from fanlora.setting import Setting

WORDS = "The quick brown fox jumps over the lazy dog while the slow cat watches from the warm window. "


def ttft(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> float:
    """Seconds from sending a streamed completion to its first text."""
    start = time.monotonic()
    first = None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):  # fmt: skip
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.monotonic() - start
    return first if first is not None else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds between the burst and B's request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.rounds < 2 or args.burst < 1 or args.prompt_tokens < 8 or args.delay < 0:
        parser.error("--rounds ≥ 2, --burst ≥ 1, --prompt-tokens ≥ 8, --delay ≥ 0")
    setting = Setting.read(args.setting)
    work = Path(tempfile.mkdtemp(prefix="fanlora-burst-"))
    for i, name in enumerate(("tenant-a", "tenant-b")):
        save_random_adapter(setting.backbone.get("source", "embedded"), setting, work / name, seed=i)
    long_prompt = " ".join([WORDS] * (args.prompt_tokens // 18 + 1))  # ~18 tokens a sentence; cut below
    report: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    fan = [sys.executable, "-m", "fanlora", "serve", "--setting", args.setting, "--adapter-dir", str(work)]
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(serving(fan))
        c = openai.OpenAI(base_url=url, api_key="none", timeout=600, max_retries=0)
        tok = c.completions.create(model="tenant-a", prompt=long_prompt, max_tokens=1)
        words = long_prompt.split()
        while tok.usage.prompt_tokens > args.prompt_tokens and len(words) > 8:  # trim to the asked length
            words = words[: int(len(words) * args.prompt_tokens / tok.usage.prompt_tokens)]
            tok = c.completions.create(model="tenant-a", prompt=" ".join(words), max_tokens=1)
        prompt = " ".join(words)
        say(f"burst: {args.burst} x {tok.usage.prompt_tokens}-token prompts of tenant A; B: a 4-token prompt")
        ttft(c, "tenant-b", "Hello there my", 4)  # warm

        def idle() -> float:
            t = ttft(c, "tenant-b", "Hello there my", 4)
            say(f"idle  B ttft {t:.3f} s")
            return t

        def burst() -> float:
            threads = [threading.Thread(target=ttft, args=(c, "tenant-a", prompt, 16)) for _ in range(args.burst)]
            for th in threads:
                th.start()
            time.sleep(args.delay)
            t = ttft(c, "tenant-b", "Hello there my", 4)
            for th in threads:
                th.join()
            say(f"burst B ttft {t:.3f} s")
            return t

        rss = {"start": server_rss(url)}
        times = balanced_rounds({"idle": idle, "burst": burst}, args.rounds)
        rss["after"] = server_rss(url)  # idle again: the KV pool that grew for the bursts is dropped
    r = per_round_ratios(times, "burst", "idle")
    ci = ratio_interval(r)
    mean_burst = ratio_interval(times["burst"])  # geometric mean of the per-round TTFTs
    say(f"TTFT behind the burst / idle: {ci['mean']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}] per round "
        f"{', '.join(f'{x:.2f}' for x in r)}")  # fmt: skip
    growth = rss["after"] / rss["start"]
    say(f"server RSS: {rss['start']:.0f} MiB after the warm-up, {rss['after']:.0f} MiB idle after the bursts "
        f"({growth:.3f}x)")  # fmt: skip
    say(f"RESULT burst_ttft_s={mean_burst['mean']:.3f} idle_ttft_s={ratio_interval(times['idle'])['mean']:.3f} "
        f"burst_vs_idle={ci['mean']:.2f} rss_after_vs_start={growth:.3f} rounds={args.rounds}")  # fmt: skip
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
