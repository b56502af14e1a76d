"""Would packing a joining prompt's prefill into the decoding step pay on this CPU? One run, side by side.

    python benchmarks/packed_prefill.py --out benchmarks/results/packed-prefill.txt

`fanlora serve`'s continuous scheduler used to run a joining prompt's prefill chunk (``--prefill-chunk`` tokens)
as a forward of its own between decoding steps; it now packs it into the decoding step (one ragged forward
carrying the B decoding rows' next tokens and the chunk, over the paged pool). That saves one forward's fixed
cost and nothing else: every position is still computed. This measures both sides on the embedded backbone,
float32, in shuffled-then-reversed rounds:

- ``separate``: a decoding step of B rows (one token each, over a KV cache of ``--context`` positions) plus a
  prefill forward of one C-token chunk — what the scheduler did before it packed;
- ``packed (upper bound)``: one forward of B + C new positions in a single row — the cost a ragged packed
  forward could reach at best (same positions, one forward; its attention over the others' caches, which a
  real packed kernel adds, is left out, so the real saving is smaller);
- ``packed (paged)``: that forward for real — :class:`fanlora.serving.paged.PagedKV`, the scheduler's pool today: the B
  rows' tokens and the chunk in one sequence, each token attending to its own row's pool positions (4-D mask);
- ``padded``: one forward of B + 1 rows × C tokens — packing with HF's padded batches, which is what the
  engine's attention supports without a ragged kernel.

The ratios separate ÷ packed say what packing is worth here; padded ÷ separate why HF's padded batches are no
way to do it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from fanlora.backbone import load_backbone
from fanlora.serving.paged import PagedKV


def timed(fn, repeat: int) -> float:
    best = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t)
    return statistics.median(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="decoding rows B")
    parser.add_argument("--chunk", type=int, default=64, help="prefill chunk C (tokens)")
    parser.add_argument("--context", type=int, default=64, help="KV positions each decoding row already holds")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    model = load_backbone("embedded").model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = lambda rows, n: torch.randint(0, vocab, (rows, n), generator=g)  # noqa: E731
    with torch.inference_mode():
        cache = DynamicCache()
        model(ids(args.rows, args.context), past_key_values=cache, use_cache=True)
        step_ids, chunk_ids = ids(args.rows, 1), ids(1, args.chunk)
        packed_ids, padded_ids = ids(1, args.rows + args.chunk), ids(args.rows + 1, args.chunk)

        def decode() -> None:
            model(step_ids, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the step just added: every timed step sees the same context

        pool = PagedKV()
        for row in range(args.rows):  # each row's context in the pool
            mask = pool.plan([(row, 0, args.context)])
            model(input_ids=ids(1, args.context), attention_mask=mask, position_ids=torch.arange(args.context)[None],
                  cache=pool, use_cache=True)  # fmt: skip
        segments = [(row, args.context, 1) for row in range(args.rows)] + [("chunk", 0, args.chunk)]
        positions = torch.tensor([[args.context] * args.rows + list(range(args.chunk))])

        def paged() -> None:  # the same plan every call: each timed step sees the same context
            mask = pool.plan(segments)
            model(input_ids=packed_ids, attention_mask=mask, position_ids=positions, cache=pool, use_cache=True)

        runs = {
            "separate": lambda: (decode(), model(chunk_ids)),
            "packed (upper bound)": lambda: model(packed_ids),
            "packed (paged)": paged,
            "padded": lambda: model(padded_ids),
        }
        for fn in runs.values():
            fn()
        times: dict[str, list[float]] = {n: [] for n in runs}
        rng = random.Random(0)
        for _ in range(args.rounds):
            order = rng.sample(list(runs), len(runs))
            for name in order + order[::-1]:
                times[name].append(timed(runs[name], 3))
    report = [
        f"embedded backbone, float32, {torch.get_num_threads()} threads: B={args.rows} decoding rows over "
        f"{args.context} cached positions, one C={args.chunk}-token prefill chunk; {args.rounds} rounds A-B-B-A"
    ]
    for name, t in times.items():
        ms = [x * 1e3 for x in t]
        report.append(f"{name:<22} median {statistics.median(ms):7.1f} ms [{min(ms):.1f}, {max(ms):.1f}]")
    gain = [s / p for s, p in zip(times["separate"], times["packed (upper bound)"], strict=True)]
    real = [s / p for s, p in zip(times["separate"], times["packed (paged)"], strict=True)]
    pad = [p / s for p, s in zip(times["padded"], times["separate"], strict=True)]
    report.append(f"separate / packed (upper bound): {statistics.median(gain):.3f} [{min(gain):.3f}, {max(gain):.3f}]")
    report.append(f"separate / packed (paged): {statistics.median(real):.3f} [{min(real):.3f}, {max(real):.3f}]")
    report.append(f"padded / separate: {statistics.median(pad):.3f} [{min(pad):.3f}, {max(pad):.3f}]")
    g, r, p = statistics.median(gain), statistics.median(real), statistics.median(pad)
    report.append(f"RESULT packed_upper_bound_speedup={g:.3f} paged_packed_speedup={r:.3f} padded_vs_separate={p:.3f}")
    print("\n".join(report))
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
