"""Does ``--mc-format lm-eval`` agree with lm-evaluation-harness item for item? Runs lm-eval itself.

Needs the optional extra: ``pip install -e ".[lmeval]"`` (lm-eval 0.4.13). Offline: lm-eval reads the same
local items through its ``json`` dataset builder, and its task files reuse lm-eval's own stock COPA/BoolQ
prompt functions (``lm_eval.tasks.super_glue``), with ``acc_norm`` switched on beside ``acc``. Both sides score
the same loaded model object (the embedded backbone unless ``--backbone``).

    python benchmarks/lm_eval_parity.py --boolq-items 100 --out benchmarks/results/lm_eval_parity.txt

Prints, per task and format: items, accuracy on each side, how many items' acc / acc_norm predictions agree,
and the largest difference of a choice's log-likelihood; last a RESULT line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fanlora import atomic
from fanlora.backbone import load_backbone
from fanlora.data.records import BUNDLED_PREFIX, read_source
from fanlora.evaluation.evaluate import evaluate_mc
from fanlora.evaluation.lm_eval_tasks import write_tasks
from fanlora.tasks import get_task
from fanlora.tasks.base import halve


def test_rows(name: str, n: int | None) -> list[dict]:
    """The records of fanlora's test split of ``name`` (the second half of the bundled validation set)."""
    rows = [r for _, r in read_source(BUNDLED_PREFIX + f"{name}/val")]
    rows = halve(rows, "test")
    return rows[:n] if n else rows


def lm_eval_samples(model, tokenizer, files: dict[str, Path], workdir: Path, batch_size: int) -> dict[str, list]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = write_tasks(workdir, files)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(workdir)),
        num_fewshot=0,
        log_samples=True,
        bootstrap_iters=0,
    )
    return {name: sorted(out["samples"][f"fanlora_{name}"], key=lambda s: s["doc_id"]) for name in files}


def compare(name: str, fmt: str, ours, theirs: list[dict]) -> tuple[str, dict]:
    preds = ours.predictions
    assert len(preds) == len(theirs), (name, len(preds), len(theirs))
    agree = sum((p["pred"] == p["label"]) == bool(s["acc"]) for p, s in zip(preds, theirs, strict=True))
    agree_norm = sum((p["pred_norm"] == p["label"]) == bool(s["acc_norm"]) for p, s in zip(preds, theirs, strict=True))
    diff = max(
        abs(a - float(resp[0]))
        for p, s in zip(preds, theirs, strict=True)
        for a, resp in zip(p["loglik"], s["filtered_resps"], strict=True)
    )
    n = len(preds)
    row = {
        "task": name,
        "format": fmt,
        "n": n,
        "acc_fanlora": ours.metrics["acc"],
        "acc_lm_eval": sum(bool(s["acc"]) for s in theirs) / n,
        "acc_norm_fanlora": ours.metrics["acc_norm"],
        "acc_norm_lm_eval": sum(bool(s["acc_norm"]) for s in theirs) / n,
        "acc_items_agree": agree,
        "acc_norm_items_agree": agree_norm,
        "max_loglik_diff": diff,
    }
    line = (
        f"| {name} | {fmt} | {n} | {row['acc_fanlora']:.3f} / {row['acc_lm_eval']:.3f} | "
        f"{row['acc_norm_fanlora']:.3f} / {row['acc_norm_lm_eval']:.3f} | {agree}/{n} | {agree_norm}/{n} | {diff:.1e} |"
    )
    return line, row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="embedded")
    ap.add_argument("--boolq-items", type=int, default=100, help="first N of BoolQ's test half (0: all 1635)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args()
    backbone = load_backbone(args.backbone)
    model, tok = backbone.model, backbone.tokenizer
    lines = [
        f"$ python benchmarks/lm_eval_parity.py {' '.join(sys.argv[1:])}",
        f"backbone: {backbone.identity['name']}; lm-eval {__import__('lm_eval').__version__}; zero-shot, test split",
        "",
        "| task | fanlora format | items | acc fanlora / lm-eval | acc_norm fanlora / lm-eval | acc items agree "
        "| acc_norm items agree | max |Δ loglik| |",
        "|---|---|---:|---|---|---:|---:|---:|",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = {}
        for name, n in (("copa", None), ("boolq", args.boolq_items or None)):
            files[name] = work / f"{name}.jsonl"
            files[name].write_text("".join(json.dumps(r) + "\n" for r in test_rows(name, n)))
        theirs = lm_eval_samples(model, tok, files, work, args.batch_size)
    for name, n in (("copa", None), ("boolq", args.boolq_items or None)):
        task = get_task(name)
        examples = task.examples("test", n)
        for fmt in ("lm-eval", "clean"):
            result = evaluate_mc(model, tok, task.formatted(examples, fmt), args.batch_size, progress=False)
            line, row = compare(name, fmt, result, theirs[name])
            lines.append(line)
            rows.append(row)
    parity = [r for r in rows if r["format"] == "lm-eval"]
    agree = all(r["acc_items_agree"] == r["n"] and r["acc_norm_items_agree"] == r["n"] for r in parity)
    lines += [
        "",
        "RESULT lm_eval_format_agrees="
        + ("yes" if agree else "no")
        + " "
        + " ".join(f"{r['task']}_max_loglik_diff={r['max_loglik_diff']:.1e}" for r in parity),
    ]
    print("\n".join(lines))
    if args.out:
        atomic.write_text(args.out, "\n".join(lines) + "\n")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
