"""The four FanLoRA stages as library calls; the CLI and the demo are thin wrappers around these.

Every stage reads its inputs from, and writes its outputs into, a run directory:

    run.json                    config that made the run
    search/adapter/             stage a: gated LoRA on all modules (PEFT format) + search/metrics.json
    scores.json, scores.csv     stage b: AB-score per (kind, layer)
    setting.json, plots/        stage c: the FanLoRA setting and its figures
    <task>/adapter/             stage d: the task adapter (PEFT format)
    <task>/metrics.json         stage d: evaluation (and <task>/predictions.jsonl)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fanlora import atomic, plots
from fanlora.backbone import Backbone, load_backbone
from fanlora.config import Config
from fanlora.data.instruct import InstructionData, load_instruction_data, read_conversations
from fanlora.errors import UserError
from fanlora.evaluate import (
    evaluate_generation,
    evaluate_mc,
    evaluate_mc_generate,
    gold_losses,
    training_examples,
)
from fanlora.gates import GatedLoRA
from fanlora.generate import Decoding
from fanlora.scoring import ScoreTable, make_batches, memory
from fanlora.scoring.progress import Progress
from fanlora.scoring.study import SHARD_FORMAT, Study, assemble, check_method, compute, stem_for
from fanlora.setting import Setting, file_sha256, select
from fanlora.tasks import get_task
from fanlora.train import train_adapter


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_main():
        print(message, flush=True)


def backbone_from(cfg: Config) -> Backbone:
    b = cfg.backbone
    return load_backbone(b.name, dtype=b.dtype, module_map=b.module_map)


def instruction_data(
    cfg: Config, backbone: Backbone, conversations: list | None = None, val_only: bool = False
) -> InstructionData:
    d = cfg.search.data
    return load_instruction_data(
        backbone.tokenizer,
        d.sources,
        max_length=d.max_length,
        val_fraction=d.val_fraction,
        split_seed=d.split_seed,
        max_records=0 if val_only else d.max_train_examples,
        conversations=conversations,
    )


def run_search(cfg: Config, run_dir: str | Path) -> Path:
    """Stage a: LoRA (rank r0) on every module of every layer, fine-tuned on the instruction corpus."""
    out = Path(run_dir) / "search"
    adapter = out / "adapter"
    if (adapter / "adapter_config.json").is_file():
        say(f"stage a: done before, adapter at {adapter}")
        return adapter
    conversations = read_conversations(cfg.search.data.sources)  # bad data fails before the model loads
    torch.manual_seed(cfg.search.train.seed)
    backbone = backbone_from(cfg)
    data = instruction_data(cfg, backbone, conversations)
    say(
        f"stage a: {len(data.train)} train / {len(data.val)} val examples; LoRA r={cfg.search.lora.r} on "
        f"{len(backbone.layout.all_modules())} modules"
    )
    lora = cfg.search.lora
    gated = GatedLoRA.create(backbone.model, backbone.layout, lora.r, lora.alpha, lora.dropout)
    start = time.time()
    result = train_adapter(gated.model, data.train, data.val, cfg.search.train, out, backbone.tokenizer.pad_token_id)
    if is_main():
        atomic.write_json(
            out / "metrics.json",
            {
                "steps": result.steps,
                "best_eval_loss": result.best_eval_loss,
                "train_loss": result.train_loss,
                "minutes": (time.time() - start) / 60,
                "n_train": len(data.train),
                "n_val": len(data.val),
                "resumed_from": result.resumed_from,
                "backbone": backbone.identity,
            },
        )
    say(f"stage a: adapter at {result.adapter_dir} (best val loss {result.best_eval_loss})")
    return result.adapter_dir


def _world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed job this process belongs to, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def scores_path(cfg: Config, run_dir: str | Path) -> Path:
    """Where `fanlora score` writes: scores.json for ab-exact, scores-<method>.json for the other methods."""
    return Path(run_dir) / f"{stem_for(cfg.score.method)}.json"


def run_score(
    cfg: Config,
    run_dir: str | Path,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> ScoreTable | Path | None:
    """Stage b: score every (kind, layer) on the val split with ``cfg.score.method``; resumable, shardable.

    Under torch.distributed the units of work split over the ranks and rank 0 writes the table (the other
    ranks return None). With ``shard=(i, n)`` this process computes shard i of n and writes a shard file
    (returned) for `fanlora scores merge`.
    """
    run_dir = Path(run_dir)
    sc = cfg.score
    check_method(sc.method, sc.shapley_budget)
    gb = sc.memory_limit_gb
    if gb is not None and (isinstance(gb, bool) or not isinstance(gb, int | float) or gb <= 0):
        raise UserError(f"score.memory_limit_gb must be a positive number of GiB or null, got {gb!r}")
    json_path = scores_path(cfg, run_dir)
    options = {"budget": sc.shapley_budget, "seed": sc.seed} if sc.method == "shapley" else {}
    if shard is None and json_path.is_file():
        table = ScoreTable.read(json_path)
        if table.meta.get("options", {}) != options:
            raise UserError(
                f"{json_path} was made with other options ({table.meta.get('options')}): delete it to re-score"
            )
        say(f"stage b: done before, scores at {json_path}")
        return table
    adapter = run_dir / "search" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"no stage-a adapter in {adapter}: run `fanlora search --run-dir {run_dir}` first")
    rank, world = _world()
    if shard is not None:
        if world > 1:
            raise UserError("--shard splits work across separate runs; under torchrun the ranks split it already")
        rank, world = shard
    backbone = backbone_from(cfg)
    if backbone.model.dtype != torch.float32:
        say("warning: scoring in a reduced precision; one module moves the loss by ~1e-4, so prefer float32")
    data = instruction_data(cfg, backbone, val_only=True)
    val = data.val[: sc.max_val_examples] if sc.max_val_examples else data.val
    device = _device()
    batches = make_batches(val, backbone.tokenizer.pad_token_id, sc.batch_size, device)
    n_tokens = sum(b.n_scored for b in batches)
    if n_tokens == 0:
        raise UserError("the validation set has no response tokens: check the data's output/response fields")
    gated = GatedLoRA.load(backbone.model, backbone.layout, adapter)
    gated.model.to(device)
    layout = backbone.layout
    study = Study(
        method=sc.method,
        kinds=layout.kinds,
        num_layers=layout.num_layers,
        module_names={f"{k}.{n}": layout.module_name(k, n) for k, n in layout.all_modules()},
        n_batches=len(batches),
        n_tokens=n_tokens,
        budget=options.get("budget", 0),
        seed=options.get("seed", 0),
    )
    adapter_sha = file_sha256(adapter / "adapter_model.safetensors")[:16]
    val_fp = InstructionData(train=[], val=val, sources=data.sources).fingerprint()
    header = {
        "backbone": backbone.identity["weights_digest"],
        "adapter": adapter_sha,
        "val": val_fp,
        "batch_size": sc.batch_size,
        "method": sc.method,
        **options,
    }
    limit = max(1, int(gb * 2**30)) if gb else memory.default_limit(device)
    units = study.units(rank, world)
    say(
        f"stage b: {sc.method} of {len(study.keys)} modules on {len(val)} val examples ({n_tokens} response "
        f"tokens){f', {world} processes' if world > 1 else ''}"
    )
    record = Progress(run_dir, study.stem, header, rank)
    start = time.time()
    bar = tqdm(total=study.cost(), desc=f"{sc.method}", disable=not progress or rank != 0, unit="pass")
    try:
        compute(study, gated, batches, record, units, limit, bar.update)
    finally:
        bar.close()
        record.close()
    meta = {
        "adapter": str(adapter),
        "adapter_sha256_16": adapter_sha,
        "options": options,
        "val": {
            "sources": data.sources,
            "n_examples": len(val),
            "n_response_tokens": n_tokens,
            "fingerprint": val_fp,
            "split_seed": cfg.search.data.split_seed,
            "batch_size": sc.batch_size,
        },
    }
    if shard is not None:
        out = run_dir / f"{study.stem}.shard-{shard[0]}-of-{shard[1]}.json"
        atomic.write_json(
            out,
            {
                "format": SHARD_FORMAT,
                "header": record.header,
                "study": study.to_dict(),
                "backbone": backbone.identity,
                "meta": meta,
                "entries": record.done,
            },
        )
        say(f"stage b: shard {shard[0]} of {shard[1]} at {out}; merge all with `fanlora scores merge`")
        return out
    entries = record.done
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(entries, gathered, dst=0)
        if rank != 0:
            dist.barrier()
            return None
        entries = {k: v for part in gathered for k, v in part.items()}
    table = assemble(study, entries)
    table.backbone = backbone.identity
    table.meta = {**meta, "minutes": (time.time() - start) / 60, "processes": world}
    table.write(json_path, json_path.with_suffix(".csv"))
    record.remove_all()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    say(f"stage b: scores at {json_path} and {json_path.with_suffix('.csv')}")
    return table


def merge_shards(paths: list[str | Path], out: str | Path) -> ScoreTable:
    """`fanlora scores merge`: one table from the shard files of one study, refusing foreign or missing ones."""
    if not paths:
        raise UserError("no shard files given: pass every scores*.shard-I-of-N.json of the study")
    first = None
    entries: dict[str, Any] = {}
    for path in paths:
        data = atomic.read_artifact(path, SHARD_FORMAT, "score shard", "fanlora score --shard I/N")
        if first is None:
            first = (path, data)
        elif data["header"] != first[1]["header"] or data["study"] != first[1]["study"]:
            raise UserError(
                f"{path} scores another study than {first[0]} (backbone, adapter, validation set or method "
                "differ): merge shards of one study only"
            )
        entries.update(data["entries"])
    assert first is not None
    study = Study(**first[1]["study"])
    table = assemble(study, entries)
    table.backbone = first[1]["backbone"]
    table.meta = {**first[1]["meta"], "shards": [str(p) for p in paths]}
    out = Path(out)
    table.write(out, out.with_suffix(".csv"))
    say(f"scores merge: {len(paths)} shards → {out}")
    return table


def run_select(
    scores_path: str | Path,
    k_max: int,
    setting_path: str | Path,
    plots_dir: str | Path | None = None,
    backbone: dict[str, Any] | None = None,
) -> Setting:
    """Stage c: top-k_max non-negative modules per layer → setting.json (+ figures).

    ``backbone`` (an identity) is the backbone the setting is meant for; scores of any other are refused.
    """
    table = ScoreTable.read(scores_path)
    theirs = table.backbone.get("weights_digest")
    if backbone is not None and theirs != backbone.get("weights_digest"):
        raise UserError(
            f"{scores_path} scores backbone {table.backbone.get('source')} (weights {theirs}), not "
            f"{backbone.get('source')} (weights {backbone.get('weights_digest')}): score this backbone first"
        )
    source = {
        "scores": str(scores_path),
        "scores_sha256_16": file_sha256(scores_path)[:16],
        "method": table.method,
        "metric": table.metric,
    }
    setting = select(table, k_max, source)
    setting.write(setting_path)
    if plots_dir is not None:
        plots.write_all(table, setting, plots_dir)
    say(f"stage c: {setting.n_modules} modules kept (K_max={k_max}) → {setting_path}")
    return setting


def run_stability(cfg: Config, run_dir: str | Path, seeds: list[int]) -> Any:
    """Stage a + scoring under each seed (``<run_dir>/seed-<s>``), then their agreement (the paper's Table 4)."""
    from fanlora import rundir
    from fanlora.config import load_config
    from fanlora.scoring.compare import compare

    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"stability needs at least two different seeds, got {seeds}: e.g. --seeds 0 1 2")
    tables, names = [], []
    for seed in seeds:
        sub = Path(run_dir) / f"seed-{seed}"
        seeded = cfg.to_dict()
        seeded["search"]["train"]["seed"] = seed
        seeded = load_config(rundir.prepare(sub, seeded, ["backbone", "search", "score"]))
        say(f"stability: seed {seed} → {sub}")
        run_search(seeded, sub)
        tables.append(run_score(seeded, sub))
        names.append(f"seed {seed}")
    result = compare(tables, names, cfg.select.k_max)
    atomic.write_json(
        Path(run_dir) / "stability.json", {"seeds": seeds, "method": cfg.score.method, **result.to_dict()}
    )
    atomic.write_text(Path(run_dir) / "stability.md", result.markdown() + "\n")
    return result


MODES = ("auto", "loglik", "generate")


def decoding_of(cfg: Config) -> Decoding:
    ev = cfg.evaluate
    return Decoding(ev.decoding, ev.num_beams, ev.temperature, ev.top_p, ev.max_new_tokens, ev.seed).check()


def load_for_eval(cfg: Config, adapter: str | Path | None, backbone: Backbone | None = None) -> tuple[Any, Backbone]:
    """The backbone, with the adapter on top when given (its setting checked against the backbone first)."""
    backbone = backbone or backbone_from(cfg)
    model = backbone.model
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
        setting_file = Path(adapter) / "setting.json"
        if setting_file.is_file():
            Setting.read(setting_file).validate(backbone)
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, backbone


def run_evaluate(
    cfg: Config,
    task_name: str,
    out_dir: str | Path,
    adapter: str | Path | None = None,
    backbone: Backbone | None = None,
    progress: bool = True,
    model: Any = None,
) -> dict[str, Any]:
    """Evaluate the base model or base + adapter on a task split.

    Writes metrics.json, predictions.jsonl (the task's metric on the first ``evaluate.limit`` examples) and
    items.jsonl (one line per example: its score and, with ``evaluate.gold_loss``, the held-out loss of its
    gold answer — the per-item outcomes that paired comparisons use).
    """
    ev = cfg.evaluate
    if ev.mode not in MODES:
        raise UserError(f"unknown evaluate mode {ev.mode!r}: use one of {', '.join(MODES)}")
    task = get_task(task_name, ev.data)
    decoding = decoding_of(cfg)
    if task.kind == "generate" and ev.mode == "loglik":
        raise UserError(f"task {task_name} is scored by generation only: drop --mode loglik")
    if not ev.accuracy and not ev.gold_loss:
        raise UserError("evaluate.accuracy and evaluate.gold_loss are both off: nothing to evaluate")
    examples = task.examples(ev.split, ev.limit) if ev.accuracy else []
    task.check(examples)
    loss_examples = task.examples(ev.split, ev.loss_limit) if ev.gold_loss else []
    if model is None:
        model, backbone = load_for_eval(cfg, adapter, backbone)
    tok = backbone.tokenizer
    started = time.time()
    metrics: dict[str, Any] = {"task": task_name, "split": ev.split, "adapter": str(adapter) if adapter else None}
    predictions: list[dict[str, Any]] = []
    if examples:
        result = _score_task(cfg, task, model, tok, examples, decoding, progress)
        if task.kind == "mc":
            metrics["mc_format"] = ev.mc_format
        metrics.update(result.metrics)
        predictions = result.predictions
    losses = (
        gold_losses(model, tok, task, loss_examples, ev.batch_size, ev.max_length, progress) if loss_examples else []
    )
    if losses:
        per_item = [v for v, _ in losses]
        metrics["gold_nll"] = sum(per_item) / len(per_item)
        metrics["gold_nll_tokens"] = sum(v * n for v, n in losses) / max(1, sum(n for _, n in losses))
        metrics["gold_nll_n"] = len(losses)
        metrics.setdefault("n", 0)
    metrics["seconds"] = round(time.time() - started, 1)
    out = Path(out_dir)
    if predictions:
        atomic.write_jsonl(out / "predictions.jsonl", predictions)
    atomic.write_jsonl(out / "items.jsonl", item_rows(task, predictions, loss_examples, losses))
    atomic.write_json(out / "metrics.json", metrics)
    say(f"evaluate: {task_name}/{ev.split} {_headline(metrics)} (n={metrics['n']}) → {out / 'metrics.json'}")
    return metrics


def _score_task(cfg: Config, task: Any, model: Any, tok: Any, examples: list[Any], decoding: Decoding, progress: bool):
    ev = cfg.evaluate
    if task.kind == "generate":
        return evaluate_generation(model, tok, task, examples, decoding, ev.batch_size, ev.max_length, progress)
    examples = task.formatted(examples, ev.mc_format)
    if ev.mode == "generate":
        return evaluate_mc_generate(model, tok, examples, decoding, ev.batch_size, ev.max_length, progress)
    return evaluate_mc(model, tok, examples, ev.batch_size, progress)


def item_rows(
    task: Any, predictions: list[dict[str, Any]], loss_examples: list[Any], losses: list[tuple[float, int]]
) -> list[dict[str, Any]]:
    """One row per example id: ``value`` (the task's per-item score) and/or ``gold_nll`` + ``gold_tokens``."""
    rows: dict[str, dict[str, Any]] = {}
    for p in predictions:
        rows.setdefault(str(p["id"]), {"id": str(p["id"])})["value"] = task.item_value(p)
    for ex, (nll, n) in zip(loss_examples, losses, strict=True):
        rows.setdefault(str(ex.id), {"id": str(ex.id)}).update({"gold_nll": nll, "gold_tokens": n})
    return list(rows.values())


HEADLINE = ("acc", "acc_norm", "acc_macro", "exact_match", "f1", "f1_em", "execution_accuracy", "answers")


def _headline(metrics: dict[str, Any]) -> str:
    parts = []
    for key in HEADLINE:
        value = metrics.get(key)
        if isinstance(value, float):
            parts.append(f"{key}={value:.4f}")
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{key}={value}")
    return " ".join(parts)


def run_evaluate_many(
    cfg: Config, tasks: list[str], outs: list[Path], adapter: str | Path | None = None
) -> list[dict[str, Any]]:
    """Several tasks on one loaded model (the backbone and adapter are loaded once)."""
    for name in tasks:  # every task and its examples are checked before the model loads
        task = get_task(name, cfg.evaluate.data)
        if cfg.evaluate.accuracy:
            task.check(task.examples(cfg.evaluate.split, cfg.evaluate.limit))
    model, backbone = load_for_eval(cfg, adapter)
    return [
        run_evaluate(cfg, name, out, adapter=adapter, backbone=backbone, model=model)
        for name, out in zip(tasks, outs, strict=True)
    ]


def task_training_data(cfg: Config, backbone: Backbone) -> tuple[list[Any], list[Any]]:
    """Stage d's train and dev examples of ``cfg.finetune.task`` (shared by `fanlora finetune` and the grids)."""
    ft = cfg.finetune
    task = get_task(ft.task, ft.data)
    tok = backbone.tokenizer
    train = training_examples(tok, task, task.examples("train", ft.max_train_examples), ft.max_length)
    dev = training_examples(tok, task, task.examples("dev", ft.max_dev_examples), ft.max_length)
    return train, dev


def run_finetune(cfg: Config, setting_path: str | Path, out_dir: str | Path) -> Path:
    """Stage d: fresh LoRA (rank r1) on exactly the setting's modules, trained on the task's train split."""
    out = Path(out_dir)
    adapter = out / "adapter"
    if (adapter / "adapter_config.json").is_file():
        say(f"stage d: done before, adapter at {adapter}")
        return adapter
    setting = Setting.read(setting_path)
    backbone = backbone_from(cfg)
    setting.validate(backbone)
    ft = cfg.finetune
    tok = backbone.tokenizer
    train, dev = task_training_data(cfg, backbone)
    torch.manual_seed(ft.train.seed)
    from fanlora.methods import build

    model = build("fanlora", backbone, {"r": ft.lora.r, "alpha": ft.lora.alpha}, setting, dropout=ft.lora.dropout).model
    say(
        f"stage d: {ft.task}: {len(train)} train / {len(dev)} dev; LoRA r={ft.lora.r} on {setting.n_modules} modules "
        f"({model.get_nb_trainable_parameters()[0]} trainable parameters)"
    )
    result = train_adapter(model, train, dev, ft.train, out, tok.pad_token_id)
    if is_main():
        setting.write(result.adapter_dir / "setting.json")  # travels with the adapter: serving checks it
        atomic.write_json(
            out / "train_metrics.json",
            {
                "task": ft.task,
                "steps": result.steps,
                "best_dev_loss": result.best_eval_loss,
                "train_loss": result.train_loss,
                "trainable_parameters": model.get_nb_trainable_parameters()[0],
                "setting": str(setting_path),
            },
        )
    say(f"stage d: adapter at {result.adapter_dir}")
    return result.adapter_dir


def run_demo(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """All four stages on one backbone, then COPA before/after: the end-to-end FanLoRA method."""
    start = time.time()
    run_dir = Path(run_dir)
    run_search(cfg, run_dir)
    run_score(cfg, run_dir)
    setting = run_select(run_dir / "scores.json", cfg.select.k_max, run_dir / "setting.json", run_dir / "plots")
    task = cfg.finetune.task
    base_dir, tuned_dir = run_dir / task / "base", run_dir / task / "fanlora"
    base = _cached_metrics(base_dir) or run_evaluate(cfg, task, base_dir)
    adapter = run_finetune(cfg, run_dir / "setting.json", tuned_dir)
    tuned = _cached_metrics(tuned_dir) or run_evaluate(cfg, task, tuned_dir, adapter=adapter)
    summary = {
        "run_dir": str(run_dir),
        "minutes": round((time.time() - start) / 60, 2),
        "modules_kept": setting.n_modules,
        "task": task,
        "split": cfg.evaluate.split,
        f"{task}_acc_base": base["acc"],
        f"{task}_acc_fanlora": tuned["acc"],
    }
    atomic.write_json(run_dir / "summary.json", summary)
    return summary


def _cached_metrics(directory: Path) -> dict[str, Any] | None:
    path = directory / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None
