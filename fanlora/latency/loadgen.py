"""A closed-loop chat load: ``clients`` threads each send the next request as soon as the last is answered.

One definition for everything that times an OpenAI-compatible server — `fanlora profile --engine vllm` and the
peer and vLLM benchmarks — so that their figures are comparable: greedy, ``max_tokens`` 16, client *i* starts
at prompt and model *i* and steps through both lists; throughput is answered requests ÷ wall time (the last
requests, which end after the deadline, included).
"""

from __future__ import annotations

import threading
import time

import openai

PROMPTS = [
    "Write one sentence about the sea.",
    "List three colours.",
    "What is the capital of Italy?",
    "Explain what a policy deductible is.",
    "Translate 'good morning' into French.",
    "Give a short tip for writing tests.",
]


def closed_loop(
    url: str, models: list[str], clients: int, seconds: float, extra_body: dict | None = None
) -> dict[str, float]:
    """Closed loop: each client sends the next request as soon as its last one is answered. ``extra_body``:
    server-specific request fields (e.g. ``{"ignore_eos": True}``: every answer ``max_tokens`` long)."""
    lat, toks, errors = [], [], []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=url, api_key="none", timeout=120, max_retries=0)
        k = i
        while time.monotonic() < end:
            t = time.monotonic()
            try:
                r = c.chat.completions.create(
                    model=models[k % len(models)],
                    max_tokens=16,
                    temperature=0,
                    messages=[{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                    extra_body=extra_body,
                )
                with lock:
                    lat.append(time.monotonic() - t)
                    toks.append(r.usage.completion_tokens if r.usage else 0)
            except Exception as exc:  # counted: the goal is zero
                with lock:
                    errors.append(repr(exc)[:120])
            k += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    q = sorted(lat) or [float("nan")]
    return {
        "requests": len(lat),
        "errors": len(errors),
        "rps": len(lat) / wall,
        "tok_s": sum(toks) / wall,
        "p50": q[len(q) // 2],
        "p99": q[min(len(q) - 1, int(0.99 * len(q)))],
    }
