"""Every helper the tests share (fixtures are in ``conftest.py``): the CLI's bad-input check, the tiny recipe, score
tables and settings on a backbone's layout, random adapters, a server in a thread. One definition each (tests import
them from here, never from conftest or another test file)."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import uvicorn

from fanlora.backbone import load_backbone
from fanlora.data.instruct import Example
from fanlora.gates import GatedLoRA
from fanlora.generate import Decoding
from fanlora.scoring.journal import Journal
from fanlora.scoring.study import Study, assemble, compute
from fanlora.scoring.table import ScoreTable
from fanlora.serving.continuous import ContinuousScheduler
from fanlora.serving.jobs import Job

WAIT = 30  # seconds: an upper bound on any wait, never a sleep
KEY = "secret-key"  # the API key the server tests start their servers with


def fail(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI expecting bad input: exit 2, one line on stderr, no traceback; returns that line."""
    from fanlora.cli import main

    capsys.readouterr()  # drop earlier commands' output (progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def tiny_recipe(model: Path) -> dict:
    """A recipe that runs every stage on the tiny model in seconds."""
    return {
        "backbone": {"name": str(model)},
        "search": {
            "data": {"max_length": 96, "max_train_examples": 24},
            "train": {
                "batch_size": 4,
                "max_steps": 4,
                "eval_steps": 2,
                "eval_batch_size": 16,
                "learning_rate": 1e-2,
                "logging_steps": 1,
            },
        },
        "score": {"max_val_examples": 4, "batch_size": 2},
        "finetune": {
            "max_length": 48,
            "max_train_examples": 16,
            "train": {"batch_size": 8, "epochs": 1, "eval_steps": 2, "eval_batch_size": 25, "learning_rate": 1e-2},
        },
        "evaluate": {"limit": 8, "batch_size": 8},
    }


def copy_run(run: Path, where: Path) -> Path:
    shutil.copytree(run, where)
    return where


def table_for(backbone, scores: dict[tuple[str, int], float]):
    """A score table on ``backbone``'s layout with the given values (every other module scores -1)."""
    from fanlora.scoring import ScoreTable

    layout = backbone.layout
    values = {f"{k}.{layer}": scores.get((k, layer), -1.0) for k, layer in layout.all_modules()}
    names = {f"{k}.{layer}": layout.module_name(k, layer) for k, layer in layout.all_modules()}
    return ScoreTable(
        backbone=backbone.identity, kinds=layout.kinds, num_layers=layout.num_layers, module_names=names, values=values
    )


def setting_for(backbone, kinds=("V", "O")):
    """The K_max = 2 setting that keeps ``kinds`` in every layer."""
    from fanlora.stages.selection import select

    return select(table_for(backbone, {(k, n): 1.0 for k, n in backbone.layout.all_modules() if k in kinds}), 2)


def make_adapter(path, tiny_llama, setting, r, alpha, seed, **extra):
    """A PEFT adapter with random (non-zero) A and B on the setting's modules, as fanlora finetune saves it."""
    from peft import LoraConfig, get_peft_model

    from fanlora.backbone import load_backbone
    from fanlora.methods import randomize

    model = get_peft_model(
        load_backbone(str(tiny_llama)).model,
        LoraConfig(r=r, lora_alpha=alpha, target_modules=setting.modules, init_lora_weights=False, **extra),
    )
    randomize(model, seed, std=0.5)
    model.save_pretrained(path)
    setting.write(path / "setting.json")
    return path


def call(url: str, path: str, body: dict | bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """(status, JSON body) of one request to a test server; an HTTP error is returned, not raised."""
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def serve_in_thread(app, server_class=uvicorn.Server, **config):
    """(server, thread, port): ``app`` served on a free loopback port by ``server_class`` in a daemon thread."""
    srv = server_class(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not srv.started and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    return srv, thread, srv.servers[0].sockets[0].getsockname()[1]


class Gate:
    """A forward pre-hook that, while armed, stops every forward pass until the test lets one through."""

    def __init__(self, model) -> None:
        self.armed = False
        self.entered = threading.Semaphore(0)
        self.permits = threading.Semaphore(0)
        model.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        if self.armed:
            self.entered.release()
            assert self.permits.acquire(timeout=WAIT), "the gate was never opened"

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=WAIT), "no forward pass reached the gate"

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.permits.release()

    def open(self) -> None:
        self.armed = False
        self.step(100)


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except Exception as exc:  # reported by the test's assertions
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


class Recorded(Job):
    """A job that keeps its events instead of sending them to an event loop."""

    def __init__(self, *args, leave_after: int | None = None, **kwargs) -> None:
        super().__init__(*args, loop=None, **kwargs)
        self.log: list[tuple[str, object]] = []
        self.leave_after = leave_after

    def emit(self, kind, value):
        self.log.append((kind, value))
        if kind == "text" and self.leave_after is not None and len(self.tokens) >= self.leave_after:
            self.cancelled = True  # the client goes away

    @property
    def text(self) -> str:
        return "".join(v for k, v in self.log if k == "text")

    @property
    def reason(self):
        return next((v for k, v in self.log if k in ("done", "error")), None)


def job(engine, prompt, adapter, decoding=None, max_tokens=12, stop=(), **kw) -> Recorded:
    ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    slot = engine.table.acquire(adapter)
    return Recorded(ids, adapter, decoding or Decoding(), max_tokens, list(stop), slot=slot, **kw)


def run(scheduler: ContinuousScheduler, arrivals: dict[int, list[Recorded]], limit: int = 400) -> None:
    """Submit ``arrivals[i]`` before iteration i; iterate until every job is done (bounded)."""
    jobs = [j for js in arrivals.values() for j in js]
    for step in range(limit):
        for j in arrivals.get(step, []):
            scheduler.submit(j)
        with scheduler.lock:
            scheduler.iterate()
        if step >= max(arrivals) and all(j.reason is not None for j in jobs):
            return
    raise AssertionError("jobs did not finish")


def alone(engine, make, **kw) -> Recorded:
    j = make()
    run(ContinuousScheduler(engine, start=False, **kw), {0: [j]})
    return j


def grid_config(tmp_path: Path, recipe_file: Path, **extra) -> Path:
    """A one-task experiment YAML on the tiny recipe (``extra`` replaces keys); its path."""
    import yaml

    config = {
        "name": "t",
        "recipe": str(recipe_file),
        "search_run": str(tmp_path / "run"),
        "out": str(tmp_path / "grid"),
        "report": str(tmp_path / "report"),
        "methods": ["fanlora", "lora"],
        "tasks": ["copa"],
        "seeds": [0, 1],
        "set": ["finetune.train.max_steps=2", "finetune.train.eval_steps=1", "finetune.max_dev_examples=4"],
        **extra,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def examples(n: int = 8) -> list:
    from fanlora.data.instruct import Example

    return [Example(input_ids=[1, 5, 9, 3, 7, 2], labels=[-100, -100, 9, 3, 7, 2]) for _ in range(n)]


def retrains_from_the_backbone_and_round_trips(method, model, before, params, tmp_path, tiny_llama) -> None:
    """Shared by the searched methods: the retrained model starts as the backbone, moves when trained, and
    loads back (through the method's ``load`` and through the evaluator's loader) to the same logits."""
    from fanlora.backbone import load_backbone
    from fanlora.stages.evaluate import load_for_eval
    from fanlora.train import train_adapter

    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, before, atol=1e-6)  # identity at the start
    train_adapter(model, examples(), examples(4), params, tmp_path / "cell", 0, (), method.save)
    with torch.no_grad():
        tuned = model(input_ids=IDS).logits
    assert not torch.allclose(tuned, before, atol=1e-4)
    for loaded in (
        method.load(load_backbone(str(tiny_llama)), tmp_path / "cell" / "adapter"),
        load_for_eval(None, tmp_path / "cell" / "adapter", load_backbone(str(tiny_llama)))[0],  # as `evaluate` does
    ):
        with torch.no_grad():
            assert torch.allclose(loaded(input_ids=IDS).logits, tuned, atol=1e-5)


# --- scoring on tiny models -----------------------------------------------------------------------------
BIG = 2**40  # memory limit that never chunks


def gated_model(path: Path, scale: float = 0.3) -> tuple[GatedLoRA, int]:
    b = load_backbone(str(path))
    gated = GatedLoRA.create(b.model, b.layout, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for name, p in gated.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, scale)
    return gated, b.tokenizer.pad_token_id


def val_set(lengths=(9, 14, 6, 11, 8)) -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(3, 40000, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * 3 + ids[3:]))
    return out


def study_for(gated: GatedLoRA, batches, method: str = "ab-exact", **kw) -> Study:
    layout = gated.layout
    return Study(
        method=method,
        kinds=layout.kinds,
        num_layers=layout.num_layers,
        module_names={f"{k}.{n}": layout.module_name(k, n) for k, n in layout.all_modules()},
        n_batches=len(batches),
        n_tokens=sum(b.n_scored for b in batches),
        **kw,
    )


def run_study(study: Study, gated, batches, tmp_path: Path, limit: int = BIG, world: int = 1) -> ScoreTable:
    progress = Journal(tmp_path, study.stem, {"t": 1})
    for rank in range(world):
        compute(study, gated, batches, progress, study.units(rank, world), limit)
    progress.close()
    return assemble(study, progress.done)


#: bf16 keeps 8 bits of mantissa, so two correct computations of the same logits that round in a different
#: order differ by a few units in the last place at the logits' scale; 4e-2 is ~5 ulps at |logit| ≈ 1 and stays
#: well under the adapters' effect (test_bf16 checks that).
BF16_LOGITS = 4e-2
#: Reduced precision: how close to the best logit a different greedy pick must be to count as a rounding tie
#: (two logits, each within :data:`BF16_LOGITS`).
TIE = 0.1


def tie_gap(engine, context: list[int], adapter: str | None, token: int) -> float:
    """How far ``token``'s logit is below the best one after ``context``, computed for the request alone."""
    ids = torch.tensor([context])
    with torch.no_grad():
        logits = engine.logits(ids, torch.ones_like(ids), [adapter])[0, -1].float()
    return float(logits.max() - logits[token])


def assert_same_answer(engine, got, solo) -> None:
    """A request served in a batch answers as it does alone.

    float32: token for token. bfloat16: token for token up to the first difference, and a greedy row's first
    difference falls on a rounding tie of the request alone (its pick within :data:`TIE` of the best logit): a
    bf16 GEMM rounds differently for a different batch shape, so a batch may break a near-tie the other way —
    no engine is batch-invariant in bf16 by default, vLLM included. A wrong row, position, KV block or adapter
    would pick a token far below the best (:func:`tie_gap` against another adapter shows it can fail). After a
    difference the two answers continue from different contexts and are not compared; a seeded sampling row is
    compared up to its first difference only."""
    if exact(engine) or got.tokens == solo.tokens:
        assert got.tokens == solo.tokens, (got.tokens, solo.tokens)
        return
    d = next((i for i, (a, b) in enumerate(zip(got.tokens, solo.tokens, strict=False)) if a != b), None)
    if d is None:  # one is a prefix of the other: a stop decided by a rounding tie
        return
    if got.decoding.strategy == "greedy":
        gap = tie_gap(engine, solo.prompt_ids + solo.tokens[:d], solo.adapter, got.tokens[d])
        assert gap < TIE, (d, gap)


def exact(engine) -> bool:
    """Whether answers must match token for token and text for text (float32; see :func:`assert_same_answer`)."""
    return next(engine.model.parameters()).dtype == torch.float32
