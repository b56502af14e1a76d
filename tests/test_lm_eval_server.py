"""lm-evaluation-harness 0.4.13, as users run it against a served adapter: ``local-completions`` (token-id prompts,
``echo`` + ``logprobs``) on COPA and BoolQ against ``fanlora serve`` gives the per-item log-likelihoods of
``fanlora evaluate --mc-format lm-eval`` on the same adapter (within 1e-4 nats) and the same predictions, item
for item; ``local-chat-completions`` runs a generation task. Before the server took token-id prompts, echo
and logprobs, lm-eval's first request was a 400 and no multiple-choice task could run.
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import make_adapter, serve_in_thread, setting_for

from fanlora.backbone import load_backbone
from fanlora.cli import main
from fanlora.data.records import BUNDLED_PREFIX, read_source
from fanlora.evaluation.lm_eval_tasks import write_tasks
from fanlora.serving.engine import Engine
from fanlora.serving.server import Limits, create_app
from fanlora.tasks.base import halve

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ITEMS = {"copa": 16, "boolq": 12}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("lm-eval")
    backbone = load_backbone(str(tiny_llama))
    setting = setting_for(backbone)
    adapter = make_adapter(root / "adapters" / "alpha", tiny_llama, setting, 4, 8, 5)
    files = {}
    for name, n in ITEMS.items():  # the first n test items whose prompt fits the tiny model's 512 positions
        rows = halve([r for _, r in read_source(BUNDLED_PREFIX + f"{name}/val")], "test")
        rows = [r for r in rows if len(backbone.tokenizer(json.dumps(r))["input_ids"]) < 400][:n]
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine = Engine.from_backbone(backbone, setting)
    app = create_app(engine, root / "adapters", None, Limits(max_tokens=32, max_queue=16, max_batch=4))
    srv, thread, port = serve_in_thread(app)
    yield {"root": root, "adapter": adapter, "files": files, "port": port, "tiny": tiny_llama}
    srv.should_exit = True
    thread.join(timeout=10)


def ours(world, name: str) -> list[dict]:
    out = world["root"] / f"eval-{name}"
    argv = ["evaluate", "--backbone", str(world["tiny"]), "--adapter", str(world["adapter"]), "--task", name,
            "--mc-format", "lm-eval", "--data", f"test={world['files'][name]}", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def theirs(world, model: str, tasks: list[str], **args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    base = "chat/completions" if model == "local-chat-completions" else "completions"
    model_args = {"model": "alpha", "base_url": f"http://127.0.0.1:{world['port']}/v1/{base}",
                  "tokenizer_backend": "huggingface", "tokenizer": str(world["tiny"]), "max_retries": 1,
                  "num_concurrent": 1, **args}  # fmt: skip
    return lm_eval.simple_evaluate(
        model=model,
        model_args=",".join(f"{k}={v}" for k, v in model_args.items()),
        tasks=tasks,
        task_manager=TaskManager(include_path=str(world["root"] / "tasks")),
        num_fewshot=0,
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=model == "local-chat-completions",
    )


@pytest.mark.e2e
def test_lm_eval_local_completions_equals_fanlora_evaluate_item_for_item(world):
    (world["root"] / "tasks").mkdir(exist_ok=True)
    tasks = write_tasks(world["root"] / "tasks", world["files"])
    out = theirs(world, "local-completions", tasks)
    for name in ITEMS:
        samples = sorted(out["samples"][f"fanlora_{name}"], key=lambda s: s["doc_id"])
        preds = ours(world, name)
        assert len(samples) == len(preds) == ITEMS[name]
        for p, s in zip(preds, samples, strict=True):
            served = [float(r[0]) for r in s["filtered_resps"]]
            assert max(abs(a - b) for a, b in zip(p["loglik"], served, strict=True)) < 1e-4, (name, p["id"])
            assert (p["pred"] == p["label"]) == bool(s["acc"]) and (p["pred_norm"] == p["label"]) == bool(s["acc_norm"])


@pytest.mark.e2e
def test_lm_eval_local_chat_completions_runs_a_generation_task(world):
    (world["root"] / "tasks").mkdir(exist_ok=True)
    data = world["root"] / "echo.jsonl"
    data.write_text("".join(json.dumps({"q": f"Say {w}.", "a": w}) + "\n" for w in ("yes", "no", "maybe")))
    (world["root"] / "tasks" / "fanlora_say.yaml").write_text(
        "task: fanlora_say\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\noutput_type: generate_until\ntest_split: test\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    out = theirs(world, "local-chat-completions", ["fanlora_say"])
    samples = out["samples"]["fanlora_say"]
    assert len(samples) == 3 and all(isinstance(s["resps"][0][0], str) for s in samples)
    assert "exact_match,none" in out["results"]["fanlora_say"]
