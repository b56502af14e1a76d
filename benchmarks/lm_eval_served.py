"""lm-eval on a *served* adapter: ``local-completions`` against ``fanlora serve`` and against vLLM with the
fanlora-vllm plugin, compared item for item with each other and with ``fanlora evaluate`` on the same adapter.

Needs lm-eval (a test dependency) and, for the vLLM side, ``.venv-vllm`` (``bash scripts/setup-vllm.sh``):

    python benchmarks/lm_eval_served.py --setting results/decisive/settings/ab.json --boolq-items 100 \\
        --out benchmarks/results/lm_eval_served.txt

The adapter is a random r=12 LoRA on the setting's modules (``--adapter DIR`` takes a trained one); the backbone
is the setting's (the embedded one: float32 on every side). lm-eval reads COPA's and BoolQ's test halves from
local files through :mod:`fanlora.evaluation.lm_eval_tasks` (its stock prompts), sends token-id prompts with
``echo`` and ``logprobs`` (its log-likelihood route) and sums the continuation's logprobs. Prints, per task and
pair of sides, the items, both accuracies, how many items' verdicts (argmax choice) agree and the largest
difference of a choice's log-likelihood; last a RESULT line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fanlora.backbone import resolve_source
from fanlora.cli import main as fanlora_main
from fanlora.data.records import BUNDLED_PREFIX, read_source
from fanlora.evaluation.lm_eval_tasks import write_tasks
from fanlora.latency.timing import save_random_adapter
from fanlora.latency.vllm_server import VllmServer, free_port, vllm_python
from fanlora.setting import Setting
from fanlora.tasks.base import halve


def rows(name: str, n: int | None) -> list[dict]:
    out = halve([r for _, r in read_source(BUNDLED_PREFIX + f"{name}/val")], "test")
    return out[:n] if n else out


def lm_eval_logliks(url: str, model: str, tokenizer: str, tasks: list[str], include: Path) -> dict[str, list]:
    """Per task, per item (by doc id): the choices' log-likelihoods lm-eval got from the server at ``url``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={tokenizer}"
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args + ",num_concurrent=1,max_retries=2",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(include)),
        num_fewshot=0,
        log_samples=True,
        bootstrap_iters=0,
    )
    return {
        t: [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])]
        for t in tasks
    }


def fanlora_logliks(setting: Setting, adapter: Path, files: dict[str, Path], work: Path) -> dict[str, list]:
    out = {}
    for name, data in files.items():
        folder = work / f"eval-{name}"
        argv = ["evaluate", "--backbone", setting.backbone.get("source", "embedded"), "--adapter", str(adapter),
                "--task", name, "--mc-format", "lm-eval", "--data", f"test={data}", "--out", str(folder)]  # fmt: skip
        if fanlora_main(argv) != 0:
            raise SystemExit(f"fanlora evaluate failed on {name}")
        preds = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        out[f"fanlora_{name}"] = [p["loglik"] for p in preds]
    return out


@contextlib.contextmanager
def fanlora_server(setting_path: str, adapters: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "fanlora", "serve", "--setting", setting_path, "--adapter-dir", str(adapters),
           "--port", str(port), "--max-tokens", "16"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("fanlora serve did not start: run it by hand to see why") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def compare(task: str, a: str, b: str, la: list, lb: list, labels: list[int]) -> dict:
    """Items, accuracies, agreeing verdicts and the largest |Δ loglik| of sides ``a`` and ``b`` on one task."""

    def right(ll: list) -> list[bool]:
        return [max(range(len(x)), key=x.__getitem__) == y for x, y in zip(ll, labels, strict=True)]

    ra, rb = right(la), right(lb)
    diff = max(abs(x - y) for ia, ib in zip(la, lb, strict=True) for x, y in zip(ia, ib, strict=True))
    return {"task": task, "pair": f"{a} / {b}", "n": len(labels), "acc_a": sum(ra) / len(labels),
            "acc_b": sum(rb) / len(labels), "agree": sum(x == y for x, y in zip(ra, rb, strict=True)),
            "max_diff": diff}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", required=True)
    ap.add_argument("--adapter", help="a trained adapter folder (default: a random r=12 one on the setting)")
    ap.add_argument("--boolq-items", type=int, default=100, help="first N of BoolQ's test half (0: all)")
    ap.add_argument("--no-vllm", action="store_true", help="fanlora serve and fanlora evaluate only")
    ap.add_argument("--out")
    args = ap.parse_args()
    setting = Setting.read(args.setting)
    model_dir, _ = resolve_source(setting.backbone.get("source", "embedded"))
    use_vllm = not args.no_vllm and vllm_python() is not None
    work = Path(tempfile.mkdtemp(prefix="fanlora-lm-eval-"))
    adapter = Path(args.adapter) if args.adapter else work / "adapters" / "probe"
    if not args.adapter:
        save_random_adapter(setting.backbone.get("source", "embedded"), setting, adapter, seed=0, std=0.05)
    data = {"copa": rows("copa", None), "boolq": rows("boolq", args.boolq_items or None)}
    files = {}
    for name, items in data.items():
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in items))
    tasks = write_tasks(work, files)
    sides = {"fanlora evaluate": fanlora_logliks(setting, adapter, files, work)}
    with fanlora_server(args.setting, adapter.parent) as url:
        sides["fanlora serve"] = lm_eval_logliks(url, adapter.name, model_dir, tasks, work)
    if use_vllm:
        server = VllmServer(model_dir, args.setting, {adapter.name: str(adapter)}, log=str(work / "vllm.log"))
        try:
            server.start().wait()
            sides["vLLM + plugin"] = lm_eval_logliks(server.url, adapter.name, model_dir, tasks, work)
        finally:
            server.stop()
    lines = [f"$ python benchmarks/lm_eval_served.py {' '.join(sys.argv[1:])}",
             f"backbone {model_dir}; adapter {'random r=12' if not args.adapter else args.adapter}; "
             f"lm-eval {__import__('lm_eval').__version__} local-completions; vLLM: {'yes' if use_vllm else 'no'}",
             "", "| task | sides | items | acc | items whose verdict agrees | max |Δ loglik| |",
             "|---|---|---:|---|---:|---:|"]  # fmt: skip
    worst = {}
    names = list(sides)
    for name, items in data.items():
        task, labels = f"fanlora_{name}", [int(r["label"]) for r in items]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                r = compare(task, a, b, sides[a][task], sides[b][task], labels)
                worst[f"{name}:{a}/{b}"] = r["max_diff"]
                lines.append(f"| {name} | {r['pair']} | {r['n']} | {r['acc_a']:.3f} / {r['acc_b']:.3f} | "
                             f"{r['agree']}/{r['n']} | {r['max_diff']:.1e} |")  # fmt: skip
    lines += ["", "RESULT " + " ".join(f"{k.replace(' ', '_')}={v:.1e}" for k, v in worst.items())]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
