"""Stage b as library calls: prepare (backbone, val batches, gated model, journal), compute this process's
units, gather them on rank 0 (torchrun) or write a shard (separate machines), assemble the table.

The scorers themselves are :mod:`fanlora.scoring.scorers` (one file each, behind one protocol); this module
only runs one over a run directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fanlora import atomic, dist
from fanlora.atomic import file_sha256
from fanlora.backbone import Backbone, from_config, module_key
from fanlora.config import Config
from fanlora.data.instruct import InstructionData, for_search
from fanlora.dist import say
from fanlora.errors import UserError
from fanlora.gates import GatedLoRA
from fanlora.scoring import ScoreTable, make_batches, memory, scorers
from fanlora.scoring.journal import Journal
from fanlora.scoring.study import SHARD_FORMAT, BareModel, Study, assemble, compute


def scores_path(cfg: Config, run_dir: str | Path) -> Path:
    """Where `fanlora score` writes: scores.json for ab-exact, scores-<method>.json for the other methods."""
    return Path(run_dir) / f"{scorers.get(cfg.score.method).stem}.json"


@dataclass
class _Scoring:
    """Everything stage b needs once prepared: the study, the gated model, the batches and the journal."""

    study: Study
    gated: GatedLoRA | BareModel
    batches: list[Any]
    record: Journal
    units: list[Any]
    limit: int
    meta: dict[str, Any]
    backbone: Backbone
    rank: int
    world: int


def _score_options(cfg: Config) -> dict[str, Any]:
    sc = cfg.score
    scorer = scorers.get(sc.method)
    gb = sc.memory_limit_gb
    if gb is not None and (isinstance(gb, bool) or not isinstance(gb, int | float) or gb <= 0):
        raise UserError(f"score.memory_limit_gb must be a positive number of GiB or null, got {gb!r}")
    return scorer.options(sc)


def _prepare_scoring(cfg: Config, run_dir: Path, options: dict[str, Any], rank: int, world: int) -> _Scoring:
    sc = cfg.score
    adapter = run_dir / "search" / "adapter"
    needs_stage_a = scorers.get(sc.method).needs_stage_a
    if needs_stage_a and not (adapter / "adapter_config.json").is_file():
        raise UserError(f"no stage-a adapter in {adapter}: run `fanlora search --run-dir {run_dir}` first")
    backbone = from_config(cfg.backbone)
    if backbone.model.dtype != torch.float32:
        say("warning: scoring in a reduced precision; one module moves the loss by ~1e-4, so prefer float32")
    data = for_search(cfg.search.data, backbone.tokenizer, val_only=True)
    val = data.val[sc.val_start :]
    val = val[: sc.max_val_examples] if sc.max_val_examples else val
    if not val:
        raise UserError(
            f"score.val_start={sc.val_start} skips all {len(data.val)} val examples: give a smaller val_start"
        )
    device = dist.device()
    batches = make_batches(val, backbone.tokenizer.pad_token_id, sc.batch_size, device)
    n_tokens = sum(b.n_scored for b in batches)
    if n_tokens == 0:
        raise UserError("the validation set has no response tokens: check the data's output/response fields")
    layout = backbone.layout
    gated = GatedLoRA.load(backbone.model, layout, adapter) if needs_stage_a else BareModel(backbone.model, layout)
    gated.model.to(device)
    study = Study(
        method=sc.method,
        kinds=layout.kinds,
        num_layers=layout.num_layers,
        module_names={module_key(k, n): layout.module_name(k, n) for k, n in layout.all_modules()},
        n_batches=len(batches),
        n_tokens=n_tokens,
        options=options,
    )
    adapter_sha = file_sha256(adapter / "adapter_model.safetensors")[:16] if needs_stage_a else None
    val_fp = InstructionData(train=[], val=val, sources=data.sources).fingerprint()
    header = {"backbone": backbone.identity["weights_digest"], "adapter": adapter_sha, "val": val_fp}
    header.update({"batch_size": sc.batch_size, "method": sc.method, **options})
    gb = sc.memory_limit_gb
    meta = {
        "adapter": str(adapter) if needs_stage_a else None,
        "adapter_sha256_16": adapter_sha,
        "options": options,
        "val": {
            "sources": data.sources,
            "start": sc.val_start,
            "n_examples": len(val),
            "n_response_tokens": n_tokens,
            "fingerprint": val_fp,
            "split_seed": cfg.search.data.split_seed,
            "batch_size": sc.batch_size,
        },
    }
    say(
        f"stage b: {sc.method} of {len(study.keys)} modules on {len(val)} val examples ({n_tokens} response "
        f"tokens){f', {world} processes' if world > 1 else ''}"
    )
    return _Scoring(
        study=study,
        gated=gated,
        batches=batches,
        record=Journal(run_dir, study.stem, header, rank),
        units=study.units(rank, world),
        limit=max(1, int(gb * 2**30)) if gb else memory.default_limit(device),
        meta=meta,
        backbone=backbone,
        rank=rank,
        world=world,
    )


def _compute_scores(job: _Scoring, progress: bool) -> dict[str, Any]:
    """This process's units of work (resuming from its journal); its finished entries."""
    bar = tqdm(total=job.study.cost(), desc=job.study.method, disable=not progress or job.rank != 0, unit="pass")
    try:
        compute(job.study, job.gated, job.batches, job.record, job.units, job.limit, bar.update)
    finally:
        bar.close()
        job.record.close()
    return job.record.done


def _gather(entries: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
    """Every rank's entries on rank 0 (None on the others); a no-op in a single process."""
    if world == 1:
        return entries
    import torch.distributed as tdist

    gathered: list[Any] | None = [None] * world if rank == 0 else None
    tdist.gather_object(entries, gathered, dst=0)
    if rank != 0:
        tdist.barrier()
        return None
    return {k: v for part in gathered for k, v in part.items()}


def run_score(cfg: Config, run_dir: str | Path, progress: bool = True) -> ScoreTable | None:
    """Stage b: score every (kind, layer) on the val split with ``cfg.score.method``; resumable.

    Under torch.distributed the units of work split over the ranks; rank 0 writes and returns the table, the
    other ranks return None.
    """
    run_dir = Path(run_dir)
    options = _score_options(cfg)
    json_path = scores_path(cfg, run_dir)
    if json_path.is_file():
        table = ScoreTable.read(json_path)
        if table.meta.get("options", {}) != options:
            raise UserError(
                f"{json_path} was made with other options ({table.meta.get('options')}): delete it to re-score"
            )
        say(f"stage b: done before, scores at {json_path}")
        return table
    rank, world = dist.group()
    job = _prepare_scoring(cfg, run_dir, options, rank, world)
    start, cpu = time.time(), time.process_time()
    entries = _gather(_compute_scores(job, progress), rank, world)
    if entries is None:
        return None
    table = assemble(job.study, entries)
    table.backbone = job.backbone.identity
    cost = {
        "cpu_seconds": time.process_time() - cpu,
        "passes": job.study.cost(),
        "needs_stage_a": job.study.scorer.needs_stage_a,
    }  # this process's CPU time (a resumed run counts only its last part)
    table.meta = {**job.meta, "minutes": (time.time() - start) / 60, "processes": world, "cost": cost}
    table.write(json_path, json_path.with_suffix(".csv"))
    job.record.remove_all()
    if world > 1:
        import torch.distributed as tdist

        tdist.barrier()
    say(f"stage b: scores at {json_path} and {json_path.with_suffix('.csv')}")
    return table


def run_score_shard(cfg: Config, run_dir: str | Path, shard: tuple[int, int], progress: bool = True) -> Path:
    """Shard ``i`` of ``n`` of stage b, for separate machines: a shard file for `fanlora scores merge`."""
    run_dir = Path(run_dir)
    options = _score_options(cfg)
    if dist.group()[1] > 1:
        raise UserError("--shard splits work across separate runs; under torchrun the ranks split it already")
    job = _prepare_scoring(cfg, run_dir, options, *shard)
    entries = _compute_scores(job, progress)
    out = run_dir / f"{job.study.stem}.shard-{shard[0]}-of-{shard[1]}.json"
    atomic.write_json(
        out,
        {
            "format": SHARD_FORMAT,
            "header": job.record.header,
            "study": job.study.to_dict(),
            "backbone": job.backbone.identity,
            "meta": job.meta,
            "entries": entries,
        },
    )
    say(f"stage b: shard {shard[0]} of {shard[1]} at {out}; merge all with `fanlora scores merge`")
    return out


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
