"""What makes stage-d training cheaper on this CPU: bf16 autocast vs fp32, side by side in one process.

    python benchmarks/training.py [--steps 12] [--tasks copa sql]

For each task, two copies of the same FanLoRA model (the demo setting, r=12, same seed, same initial LoRA
weights) train on the same batches, one step each in turn: one in fp32, one under
``torch.autocast("cpu", dtype=torch.bfloat16)`` — what Trainer's ``bf16=True`` does on a CPU (weights and
optimizer stay fp32). It prints the median seconds per step of each, their ratio, and both models' fp32 loss
on held-out dev examples afterwards (does bf16 change the result?). Packing is not measured: our collator
pads per batch and the tasks' examples are short and similar in length; dropout is already 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch

from fanlora.backbone import load_backbone
from fanlora.data.collate import pad_batch
from fanlora.evaluation.evaluate import training_examples
from fanlora.methods import build
from fanlora.setting import Setting
from fanlora.tasks import get_task

SHAPES = {"copa": (16, 64), "boolq": (8, 320), "sql": (8, 256)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="runs/demo/setting.json")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--tasks", nargs="+", default=["copa", "sql"])
    args = ap.parse_args()
    setting = Setting.read(args.setting)
    print(f"{torch.get_num_threads()} threads; {args.steps} steps per precision, alternating step by step")
    results = {}
    for name in args.tasks:
        bs, max_len = SHAPES[name]
        backbone = load_backbone("embedded")
        task = get_task(name)
        tok = backbone.tokenizer
        train = training_examples(tok, task, task.examples("train", bs * args.steps), max_len)
        dev = pad_batch(training_examples(tok, task, task.examples("dev", 32), max_len), tok.pad_token_id)
        torch.manual_seed(0)
        fp32 = build("fanlora", backbone, {"r": 12, "alpha": 24}, setting).model
        bf16 = copy.deepcopy(fp32)
        runs = {
            "fp32": (fp32, contextlib.nullcontext),
            "bf16": (bf16, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        }
        opts = {
            k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-4) for k, (m, _) in runs.items()
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for step in range(args.steps):
            batch = pad_batch(train[step * bs : (step + 1) * bs], tok.pad_token_id)
            for k, (model, ctx) in runs.items():
                model.train()
                start = time.perf_counter()
                with ctx():
                    loss = model(**batch).loss
                loss.backward()
                opts[k].step()
                opts[k].zero_grad()
                times[k].append(time.perf_counter() - start)
        dev_loss = {}
        with torch.no_grad():
            for k, (model, _) in runs.items():
                model.eval()
                dev_loss[k] = float(model(**dev).loss)
        tokens = sum(int(batch["attention_mask"].sum()) for batch in [pad_batch(train[:bs], tok.pad_token_id)])
        med = {k: statistics.median(v[1:]) for k, v in times.items()}  # step 0 warms up
        ratio = med["fp32"] / med["bf16"]
        results[name] = ratio
        print(
            f"{name}: batch {bs} x <= {max_len} tokens (~{tokens} real in the first): fp32 {med['fp32']:.2f} s/step, "
            f"bf16 {med['bf16']:.2f} s/step → bf16 {ratio:.2f}x faster; dev loss after {args.steps} steps "
            f"fp32 {dev_loss['fp32']:.4f} vs bf16 {dev_loss['bf16']:.4f} (initial model, same batches)"
        )
    print("RESULT " + " ".join(f"bf16_speedup_{k}={v:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
