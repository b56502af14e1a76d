"""``fanlora serve``'s limits and service flags, one per field of :class:`fanlora.serving.api.Limits` (the
command builds ``Limits`` from them by name). Kept apart from :mod:`fanlora.cli` so that file stays a map of
the commands; imports nothing heavy (``fanlora --help`` loads it)."""

from __future__ import annotations

import argparse


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The limits a request meets and the engine's adapter slots."""
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before answering 503")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument(
        "--threads",
        type=_threads,
        help="torch threads: N, or auto — as many as the CPUs other processes leave, looked at every second "
        "(default: $FANLORA_THREADS or $OMP_NUM_THREADS when set, else auto); docs/serving.md, Threads",
    )
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=64,
        help="largest LoRA rank an adapter may have (as vLLM's flag): every module's stacks are as wide as the "
        "largest loaded rank, so one huge-rank adapter would slow every tenant",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        default=16,
        help="adapters resident in the engine's slots at once (as vLLM's); a request for another waits for the "
        "least recently used idle one to be evicted (default 16)",
    )
    p.add_argument(
        "--max-cpu-loras",
        type=int,
        default=32,
        help="parsed adapters kept in host memory, least recently used out, so an evicted adapter comes back "
        "without reading its folder again (as vLLM's; default 32, 0: none)",
    )
    _operation_flags(p)


def _operation_flags(p: argparse.ArgumentParser) -> None:
    """serve's flags for running it as a service: draining, overload, the schedulers' budgets and memory."""
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM: stop admitting (503) and let running requests finish for at most this long",
    )
    p.add_argument(
        "--overload-seconds",
        type=float,
        default=30.0,
        help="a request that waits longer than this for a row counts as late (/metrics) and makes GET /ready "
        "answer 503 overloaded until the queue drains (default 30)",
    )
    p.add_argument(
        "--scheduler",
        choices=["continuous", "batch"],
        default="continuous",
        help="continuous (default): requests join and leave the batch at every decoding step; batch: one "
        "generate() call per batch, later requests wait for all of it",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=64.0,
        help="continuous: MiB of prompt-prefix KV kept per adapter load and reused by later prompts that start "
        "with the same 16-token blocks (least recently used first out; default 64, 0: off)",
    )
    p.add_argument(
        "--kv-cache-mb",
        type=float,
        help="continuous: MiB of the paged KV pool (default: an eighth of the machine's memory, said at start); "
        "it grows to this and no further, rows are preempted and recomputed when it is full, and a request "
        "that could never fit gets a 400",
    )
    p.add_argument(
        "--max-batched-tokens",
        "--prefill-chunk",
        dest="max_batched_tokens",
        type=int,
        default=256,
        help="continuous: tokens per forward (vLLM's name; --prefill-chunk is the old one): each decoding row's "
        "next token, then prompt tokens shared fairly across tenants (adapters) and their prompts",
    )


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit():  # a count < 1 is refused with the CPUs available (fanlora.dist.choose_threads)
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of threads or auto")
    return int(text)
