"""``fanlora serve``'s limits and service flags, one per field of :class:`fanlora.serving.api.Limits` (the
command builds ``Limits`` from them by name). Kept apart from :mod:`fanlora.cli` so that file stays a map of
the commands; imports nothing heavy (``fanlora --help`` loads it)."""

from __future__ import annotations

import argparse

#: serve's defaults, defined once: these flags, :class:`fanlora.serving.api.Limits`, the schedulers and the
#: adapter reader take them from here.
DEFAULTS = {
    "max_tokens": 512,  # per request
    "max_body_bytes": 1_000_000,
    "max_queue": 64,
    "max_batch": 16,
    "scheduler": "continuous",
    "max_batched_tokens": 256,
    "prefix_cache_mb": 64.0,
    "max_lora_rank": 64,  # as vLLM's --max-lora-rank: one huge-rank adapter would widen every tenant's stacks
    "max_loras": 16,
    "max_cpu_loras": 32,
    "drain_seconds": 30.0,
    "overload_seconds": 30.0,
}


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The limits a request meets and the engine's adapter slots."""
    p.add_argument(
        "--max-tokens", type=int, default=DEFAULTS["max_tokens"], help="largest max_tokens a request may ask for"
    )
    p.add_argument("--max-queue", type=int, default=DEFAULTS["max_queue"], help="queued requests before answering 503")
    p.add_argument("--max-batch", type=int, default=DEFAULTS["max_batch"], help="requests decoded together")
    p.add_argument(
        "--threads",
        type=_threads,
        help="torch threads: N, or auto — as many as the CPUs other processes leave, looked at every second "
        "(default: $FANLORA_THREADS or $OMP_NUM_THREADS when set, else auto); docs/serving.md, Threads",
    )
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=DEFAULTS["max_lora_rank"],
        help="largest LoRA rank an adapter may have (as vLLM's flag): every module's stacks are as wide as the "
        "largest loaded rank, so one huge-rank adapter would slow every tenant",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        default=DEFAULTS["max_loras"],
        help="adapters resident in the engine's slots at once (as vLLM's); a request for another waits for the "
        "least recently used idle one to be evicted (default %(default)s)",
    )
    p.add_argument(
        "--max-cpu-loras",
        type=int,
        default=DEFAULTS["max_cpu_loras"],
        help="parsed adapters kept in host memory, least recently used out, so an evicted adapter comes back "
        "without reading its folder again (as vLLM's; default %(default)s, 0: none)",
    )
    _operation_flags(p)


def _operation_flags(p: argparse.ArgumentParser) -> None:
    """serve's flags for running it as a service: draining, overload, the schedulers' budgets and memory."""
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=DEFAULTS["drain_seconds"],
        help="on SIGTERM: stop admitting (503) and let running requests finish for at most this long",
    )
    p.add_argument(
        "--overload-seconds",
        type=float,
        default=DEFAULTS["overload_seconds"],
        help="a request that waits longer than this for a row counts as late (/metrics) and makes GET /ready "
        "answer 503 overloaded until the queue drains (default %(default)s)",
    )
    p.add_argument(
        "--scheduler",
        choices=["continuous", "batch"],
        default=DEFAULTS["scheduler"],
        help="continuous (default): requests join and leave the batch at every decoding step; batch: one "
        "generate() call per batch, later requests wait for all of it",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=DEFAULTS["prefix_cache_mb"],
        help="continuous: MiB of prompt-prefix KV kept per adapter load and reused by later prompts that start "
        "with the same 16-token blocks (least recently used first out; default %(default)s, 0: off)",
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
        default=DEFAULTS["max_batched_tokens"],
        help="continuous: tokens per forward (vLLM's name; --prefill-chunk is the old one): each decoding row's "
        "next token, then prompt tokens shared fairly across tenants (adapters) and their prompts",
    )


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit():  # a count < 1 is refused with the CPUs available (fanlora.dist.choose_threads)
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of threads or auto")
    return int(text)
