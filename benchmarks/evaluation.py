"""BoolQ with the embedded backbone: log-likelihood vs generation scoring, examples per second, side by side.

    python benchmarks/evaluation.py [--examples 64] [--rounds 2] [--batch-size 16]

Three ways of scoring the same BoolQ dev examples in one process, interleaved round by round so that the
machine's drift hits all of them alike:
- ``loglik-1pass``: what ``fanlora evaluate`` does — " no"/" yes" are single tokens, so one forward pass of
  the context gives both choices' log-likelihoods;
- ``loglik-per-choice``: one pass per (context, choice) pair, as lm-evaluation-harness batches them;
- ``generate``: greedy generation of up to 3 tokens after the context, matched to " no"/" yes".
It prints each method's examples/s (median over rounds), the ratios, the accuracy of each (the two
log-likelihood paths must agree exactly) and a RESULT line.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fanlora.backbone import load_backbone
from fanlora.evaluation.evaluate import (
    choice_logliks,
    encode_pair,
    evaluate_mc,
    evaluate_mc_generate,
)
from fanlora.generate import Decoding
from fanlora.tasks import get_task


def per_choice(model, tok, examples, batch_size: int) -> float:
    pairs = [encode_pair(tok, ex.context, c) for ex in examples for c in ex.choices]
    lls = choice_logliks(model, tok, pairs, batch_size, progress=False)
    hits = sum(max(range(2), key=lambda j, i=i: lls[2 * i + j]) == ex.label for i, ex in enumerate(examples))
    return hits / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = load_backbone("embedded")
    model, tok = backbone.model.eval(), backbone.tokenizer
    examples = get_task("boolq").examples("dev", args.examples)
    n_tokens = sum(len(encode_pair(tok, ex.context, "").input_ids) for ex in examples)
    print(
        f"BoolQ dev: {len(examples)} examples, {n_tokens / len(examples):.0f} context tokens on average; "
        f"batch {args.batch_size}; threads {torch.get_num_threads()}"
    )
    runs = {
        "loglik-1pass": lambda: evaluate_mc(model, tok, examples, args.batch_size, progress=False).metrics["acc"],
        "loglik-per-choice": lambda: per_choice(model, tok, examples, args.batch_size),
        "generate": lambda: evaluate_mc_generate(
            model, tok, examples, Decoding("greedy", max_new_tokens=3), args.batch_size, progress=False
        ).metrics["acc"],
    }
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    accuracy: dict[str, float] = {}
    with torch.no_grad():
        for r in range(args.rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                accuracy[name] = fn()
                seconds[name].append(time.perf_counter() - start)
                print(f"round {r + 1} {name}: {seconds[name][-1]:.1f} s, acc {accuracy[name]:.4f}", flush=True)
    rate = {k: len(examples) / statistics.median(v) for k, v in seconds.items()}
    print()
    print("| method | examples/s | vs loglik-1pass | accuracy |")
    print("|---|---:|---:|---:|")
    for name in runs:
        print(f"| {name} | {rate[name]:.2f} | {rate[name] / rate['loglik-1pass']:.2f}x | {accuracy[name]:.4f} |")
    if accuracy["loglik-1pass"] != accuracy["loglik-per-choice"]:
        raise SystemExit("the two log-likelihood paths disagree: a bug")
    print(
        f"RESULT loglik_per_s={rate['loglik-1pass']:.2f} generate_per_s={rate['generate']:.2f} "
        f"loglik_vs_generate={rate['loglik-1pass'] / rate['generate']:.2f} "
        f"one_pass_vs_per_choice={rate['loglik-1pass'] / rate['loglik-per-choice']:.2f}"
    )


if __name__ == "__main__":
    main()
