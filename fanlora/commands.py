"""One handler per ``fanlora`` subcommand: build the config, call one library function, say where results went.

The parser (:mod:`fanlora.cli`) binds each subcommand to its handler with ``set_defaults(func=…)``; every
handler takes the parsed arguments and returns the exit status. Bad input is a :class:`UserError`.

Handlers import the library inside their body on purpose: torch, transformers and PEFT take seconds to import,
and ``fanlora --help`` or a bad flag should answer at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from fanlora import atomic, dist
from fanlora.config import Config, check_values, flag_overrides, load_config
from fanlora.errors import UserError

SECTIONS = {
    "search": ["backbone", "search"],
    "score": ["backbone", "search", "score"],
    "stability": ["backbone", "search", "score", "select"],
    "finetune": ["backbone", "finetune", "evaluate"],
    "demo": ["backbone", "search", "score", "select", "finetune", "evaluate"],
}


def apply_eval_options(args: argparse.Namespace, cfg: Config) -> None:
    """--data on top of the config (the evaluate.* flags are config overrides already, see config_for)."""
    ev = cfg.evaluate
    data = {}
    for item in getattr(args, "data", []):
        split, sep, source = item.partition("=")
        if not sep or not split or not source:
            raise UserError(f"--data {item!r}: expected SPLIT=SOURCE, e.g. --data train=my_train.jsonl")
        data[split] = source
    if data:
        ev.data = {**(ev.data or {}), **data}
        if args.command == "finetune":
            cfg.finetune.data = {**(cfg.finetune.data or {}), **data}
    check_values(cfg)  # the flags above are held to the same ranges as the recipe


def _setting_backbone(args: argparse.Namespace) -> str | None:
    """The backbone a setting (or an adapter's copy of it) was made for: the default for finetune/evaluate."""
    path = getattr(args, "setting", None) or (
        Path(args.adapter) / "setting.json" if getattr(args, "adapter", None) else None
    )
    if path is None or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())["backbone"]["source"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None  # Setting.read() reports a broken file properly later


def config_for(args: argparse.Namespace, stored_dir: Path | None = None) -> Config:
    overrides = list(args.overrides)
    backbone = getattr(args, "backbone", None)
    if backbone is None and args.config is None and args.command in ("finetune", "evaluate"):
        backbone = _setting_backbone(args)
    if backbone:
        overrides.insert(0, f"backbone.name={json.dumps(backbone)}")
    if getattr(args, "module_map", None):
        overrides.insert(0, f"backbone.module_map={json.dumps(args.module_map)}")
    overrides += flag_overrides(vars(args))  # --method, --num-beams, …: generated from the config's fields
    source = args.config
    if source is None and args.command == "demo":
        source = "demo"
    elif source is None and stored_dir is not None and not getattr(args, "overwrite", False):
        # later stages of a run reuse the config its first stage stored
        meta = stored_dir / "run.json"
        if meta.is_file():
            stored = atomic.read_json(meta, "pass --overwrite to start this run again")
            source = stored.get("config") if isinstance(stored, dict) else None
            if isinstance(source, dict):
                from fanlora.stages.rundir import PER_COMMAND

                # which scorer the last command ran is not part of the run: --method etc. default afresh
                for key in PER_COMMAND:
                    section, name = key.split(".")
                    source.get(section, {}).pop(name, None)
    return load_config(source, overrides)


def prepared(
    args: argparse.Namespace, cfg: Config, run_dir: Path, sections: list[str], inputs: dict[str, str] | None = None
) -> Config:
    from fanlora.stages import rundir

    def prep() -> dict:
        return rundir.prepare(run_dir, cfg.to_dict(), sections, args.resume, args.overwrite, inputs)

    if dist.world_size() > 1:
        import torch
        from accelerate import PartialState

        # without cpu=True accelerate sees no distributed setup on a CPU-only machine and every rank is "main"
        state = PartialState(cpu=not torch.cuda.is_available())
        with state.main_process_first():
            # rank 0 checks and writes run.json; the others read the config it settled on
            data = prep() if state.is_main_process else json.loads((run_dir / "run.json").read_text())["config"]
    else:
        data = prep()
    return load_config(data)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise UserError(f"--shard {text!r} is not I/N with 0 <= I < N: e.g. --shard 0/4 ... --shard 3/4")
    return i, n


def _intended_backbone(args: argparse.Namespace, scores: Path) -> dict | None:
    """For `select`: the identity of --backbone if given (loaded with the module map the scores name, for
    backbones that need one), else of the run's own stage-a backbone."""
    if args.backbone:
        from fanlora.backbone import load_backbone
        from fanlora.scoring.table import ScoreTable
        from fanlora.stages.budget import table_module_map

        return load_backbone(args.backbone, module_map=table_module_map(ScoreTable.read(scores))).identity
    if args.run_dir:
        metrics = Path(args.run_dir) / "search" / "metrics.json"
        if metrics.is_file():
            data = atomic.read_json(metrics, "re-run `fanlora search`")
            return data.get("backbone") if isinstance(data, dict) else None
    return None


def _stage_config(args: argparse.Namespace) -> Config:
    """Config of a stage-a/b command: stored with the run, the scoring method checked before any directory."""
    from fanlora.scoring import scorers

    cfg = config_for(args, Path(args.run_dir))
    scorers.get(cfg.score.method).options(cfg.score)
    return cfg


def search(args: argparse.Namespace) -> int:
    from fanlora.stages.search import run_search

    cfg = prepared(args, _stage_config(args), Path(args.run_dir), SECTIONS["search"])
    run_search(cfg, Path(args.run_dir))
    return 0


def score(args: argparse.Namespace) -> int:
    from fanlora.scoring import stage

    cfg = _stage_config(args)
    shard = parse_shard(args.shard) if args.shard else None
    cfg = prepared(args, cfg, Path(args.run_dir), SECTIONS["score"])
    if shard is None:
        stage.run_score(cfg, Path(args.run_dir))
    else:
        stage.run_score_shard(cfg, Path(args.run_dir), shard)
    return 0


def demo(args: argparse.Namespace) -> int:
    from fanlora import report
    from fanlora.stages.demo import run_demo

    cfg = prepared(args, _stage_config(args), Path(args.run_dir), SECTIONS["demo"])
    s = run_demo(cfg, Path(args.run_dir))
    t = s["task"]
    print(f"report: {report.write_report(args.run_dir)}", flush=True)
    print(
        f"RESULT run_dir={s['run_dir']} minutes={s['minutes']:.2f} modules_kept={s['modules_kept']} "
        f"{t}_acc_base={s[f'{t}_acc_base']:.4f} {t}_acc_fanlora={s[f'{t}_acc_fanlora']:.4f}",
        flush=True,
    )
    return 0


def select(args: argparse.Namespace) -> int:
    from fanlora.stages.select import run_select

    scores = Path(args.scores) if args.scores else Path(args.run_dir) / "scores.json"
    out = Path(args.out) if args.out else scores.parent / "setting.json"
    plots = None if args.no_plots else out.parent / "plots"
    if args.budget is None and args.profile:
        raise UserError("--profile is only used with --budget latency=P%")
    if args.budget is None and args.engine != "fanlora":
        raise UserError("--engine only changes how a latency budget is costed: add --budget latency=P%")
    if args.k_max is not None and args.k_max < 1:
        raise UserError(f"--k-max must be >= 1, got {args.k_max}: leave it out for no per-layer cap")
    backbone = _intended_backbone(args, scores)
    run_select(scores, args.k_max, out, plots, backbone, args.budget, args.r1, args.profile, args.engine)
    return 0


def scores_merge(args: argparse.Namespace) -> int:
    from fanlora.scoring import stage

    stage.merge_shards(args.files, args.out)
    return 0


def scores_compare(args: argparse.Namespace) -> int:
    from fanlora import atomic
    from fanlora.scoring.compare import compare_files

    result = compare_files(args.files, args.k_max)
    print(result.markdown())
    if args.out:
        atomic.write_json(args.out, result.to_dict())
    return 0


def compare(args: argparse.Namespace) -> int:
    from fanlora.experiments.compare import compare_folders

    return compare_folders(args.a, args.b, args.metric, args.out)


def stability(args: argparse.Namespace) -> int:
    from fanlora.stages import stability as study

    cfg = prepared(args, _stage_config(args), Path(args.run_dir), SECTIONS["stability"])
    if args.split_half:
        result = study.run_split_half(cfg, Path(args.run_dir), args.seeds[0])
        print(result.markdown())
        print(f"RESULT split_half_spearman={result.spearman[0][1]:.4f} seed={args.seeds[0]}", flush=True)
        return 0
    result = study.run_stability(cfg, Path(args.run_dir), args.seeds)
    print(result.markdown())
    n = len(args.seeds)
    off = [result.spearman[i][j] for i in range(n) for j in range(n) if i != j]
    print(f"RESULT seeds={n} spearman_min={min(off):.4f} spearman_max={max(off):.4f}", flush=True)
    return 0


def finetune(args: argparse.Namespace) -> int:
    from fanlora.stages import adapt
    from fanlora.tasks import get_task

    cfg = config_for(args)
    if args.task:
        cfg.finetune.task = args.task
    apply_eval_options(args, cfg)
    adapt.decoding_of(cfg)
    get_task(cfg.finetune.task, cfg.finetune.data)  # unknown task or split: say so before any work
    run_dir = Path(args.run_dir or f"runs/{cfg.finetune.task}")
    setting = Path(args.setting)
    if not setting.is_file():
        raise UserError(f"setting file {setting} does not exist: run `fanlora select` first or fix the path")
    digest = hashlib.sha256(setting.read_bytes()).hexdigest()
    cfg = prepared(args, cfg, run_dir, SECTIONS["finetune"], {"setting_sha256": digest})
    adapter = adapt.run_finetune(cfg, args.setting, run_dir)
    adapt.run_evaluate(cfg, cfg.finetune.task, run_dir, adapter=adapter)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from fanlora.stages import adapt

    cfg = config_for(args)
    if args.split:
        cfg.evaluate.split = args.split
    if args.limit is not None:
        cfg.evaluate.limit = args.limit
    apply_eval_options(args, cfg)
    adapt.decoding_of(cfg)
    tasks = list(dict.fromkeys(args.task))
    outs = []
    for name in tasks:
        if args.out:
            outs.append(Path(args.out) / name if len(tasks) > 1 else Path(args.out))
        else:
            outs.append(Path(args.adapter).parent / f"eval-{name}" if args.adapter else Path(f"runs/eval-{name}-base"))
    adapt.run_evaluate_many(cfg, tasks, outs, adapter=args.adapter)
    return 0


def bench(args: argparse.Namespace) -> int:
    from fanlora import atomic
    from fanlora.latency import bench as serving_bench

    if min(args.rounds, args.prompt_tokens, args.new_tokens, args.tenants) < 1:
        raise UserError("--rounds, --prompt-tokens, --new-tokens and --tenants must be ≥ 1")
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    serving_bench.run(args.setting, args.backbone, args.prompt_tokens, args.new_tokens, args.rounds, args.tenants, say)
    if args.out:
        command = "fanlora " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "fanlora bench …"
        atomic.write_text(args.out, f"$ {command}\n" + "\n".join(lines) + "\n")
    return 0


def profile(args: argparse.Namespace) -> int:
    from fanlora.latency import profile as latency

    if min(args.r, args.rounds, args.prompt_tokens, args.steps) < 1:
        raise UserError("--r, --rounds, --prompt-tokens and --steps must be ≥ 1")
    if args.engine == "vllm":
        from fanlora.latency import vllm_profile
        from fanlora.serving.vllm import vllm_python

        if vllm_python() is None:
            raise UserError("--engine vllm profiles through vLLM's server: run `bash scripts/setup-vllm.sh` first")
        vllm_profile.run_vllm_profile(args.backbone, args.r, out=args.out, say=lambda line: print(line, flush=True))
        return 0
    latency.run_profile(
        args.backbone,
        args.r,
        args.prompt_tokens,
        args.steps,
        args.rounds,
        args.out,
        lambda line: print(line, flush=True),
    )
    return 0


def report(args: argparse.Namespace) -> int:
    from fanlora.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")
    return 0


def experiment(args: argparse.Namespace) -> int:
    from fanlora.experiments import config as grid_config
    from fanlora.experiments import grid

    exp = grid_config.parse(args.config)
    if args.list:
        for cell in grid_config.cells(exp):
            done = (Path(exp.out) / "cells" / cell.id / "cell.json").is_file()
            print(f"{'done' if done else 'todo'}  {cell.id}")
        return 0
    if args.aggregate:
        summary = grid.aggregate(exp)
        print(f"{summary['cells_done']}/{summary['cells']} cells → {exp.report}/results.md")
        return 0
    shard = parse_shard(args.shard) if args.shard else (0, 1)
    summary = grid.run(exp, resume=args.resume, shard=shard, only=args.cells)
    print(
        f"RESULT experiment={exp.name} cells_done={summary['cells_done']}/{summary['cells']} "
        f"grid_minutes={summary['grid_minutes']} report={exp.report}/results.md"
    )
    return 0


def serve(args: argparse.Namespace) -> int:
    from fanlora.serving.server import Limits
    from fanlora.serving.server import serve as run_server

    key = args.api_key if args.api_key is not None else (os.environ.get("FANLORA_API_KEY") or None)
    limits = Limits(**{k: getattr(args, k) for k in Limits.model_fields if k != "max_body_bytes"})  # one per flag
    run_server(args.setting, args.adapter_dir, args.backbone, args.host, args.port, key, limits)
    return 0


def judge(args: argparse.Namespace) -> int:
    from fanlora.evaluation import judge as mtbench_judge

    mtbench_judge.read_answers(args.answers)  # bad directories fail before any request
    if args.against:
        mtbench_judge.read_answers(args.against)
    kept = f" (the answers in {args.answers} are kept; a re-run continues the judging)"
    ask = mtbench_judge.openai_asker(
        args.judge_url, args.judge_model, os.environ.get(args.api_key_env), args.timeout, kept
    )
    if args.against:
        out = args.out or str(Path(args.answers) / f"pairwise-vs-{Path(args.against).name}")
        m = mtbench_judge.compare(args.answers, args.against, ask, out, args.judge_model)
        print(f"RESULT wins_a={m['wins_a']} wins_b={m['wins_b']} ties={m['ties']} win_rate_a={m['win_rate_a']:.4f}")
        return 0
    m = mtbench_judge.grade(args.answers, ask, args.out or args.answers, args.judge_model)
    print(
        f"RESULT mtbench_score={m['score']:.4f} turn1={m['score_turn1']} turn2={m['score_turn2']} "
        f"judged={m['judged']} unrated={m['unrated']}"
    )
    return 0
