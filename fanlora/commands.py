"""One handler per ``fanlora`` subcommand: build the config, call one library function, say where results went.

The parser (:mod:`fanlora.cli`) binds each subcommand to its handler with ``set_defaults(func=…)``; every
handler takes the parsed arguments and returns the exit status. Bad input is a :class:`UserError`.

Handlers import the library inside their body on purpose: torch, transformers and PEFT take seconds to import,
and ``fanlora --help`` or a bad flag should answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fanlora import atomic
from fanlora.config import Config, check_values, flag_overrides, load_config
from fanlora.errors import UserError


def apply_eval_options(args: argparse.Namespace, cfg: Config) -> dict[str, str]:
    """--data SPLIT=SOURCE pairs on top of the config's evaluate.data (the evaluate.* flags are config overrides
    already, see config_for); returns the pairs, which finetune applies to its training data too."""
    data = {}
    for item in getattr(args, "data", []):
        split, sep, source = item.partition("=")
        if not sep or not split or not source:
            raise UserError(f"--data {item!r}: expected SPLIT=SOURCE, e.g. --data train=my_train.jsonl")
        data[split] = source
    if data:
        cfg.evaluate.data = {**(cfg.evaluate.data or {}), **data}
    check_values(cfg)  # the flags above are held to the same ranges as the recipe
    return data


def adapter_backbone(args: argparse.Namespace) -> str | None:
    """The backbone an adapter's copy of its setting was made for: `evaluate --adapter`'s default backbone."""
    path = Path(args.adapter) / "setting.json" if getattr(args, "adapter", None) else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["backbone"]["source"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None  # Setting.read() reports a broken file properly later


def config_for(
    args: argparse.Namespace,
    stored_dir: Path | None = None,
    default_source: str | None = None,
    default_backbone: str | None = None,
) -> Config:
    """The command's config: --config (else the run's stored config, else ``default_source``), then --backbone
    (else ``default_backbone`` when no recipe is named), --module-map, the config flags and --set."""
    from fanlora.stages import rundir

    overrides = list(args.overrides)
    backbone = getattr(args, "backbone", None) or (default_backbone if args.config is None else None)
    if backbone:
        overrides.insert(0, f"backbone.name={json.dumps(backbone)}")
    if getattr(args, "module_map", None):
        overrides.insert(0, f"backbone.module_map={json.dumps(args.module_map)}")
    overrides += flag_overrides(vars(args))  # --scorer, --num-beams, …: generated from the config's fields
    source = args.config or default_source
    if source is None and stored_dir is not None and not getattr(args, "overwrite", False):
        source = rundir.stored_config(stored_dir)  # later stages of a run reuse the config its first stage stored
    return load_config(source, overrides)


def prepared(args: argparse.Namespace, cfg: Config, command: str, inputs: dict[str, str] | None = None) -> Config:
    """The run directory of ``command`` opened (:func:`fanlora.stages.rundir.open_run`) with ``args``' flags."""
    from fanlora.stages import rundir

    return rundir.open_run(args.run_dir, cfg, command, args.resume, args.overwrite, inputs)


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


def _stage_config(args: argparse.Namespace, default_source: str | None = None) -> Config:
    """Config of a stage-a/b command: stored with the run, the scoring method checked before any directory."""
    from fanlora.scoring import scorers

    cfg = config_for(args, Path(args.run_dir), default_source)
    scorers.get(cfg.score.method).options(cfg.score)
    return cfg


def search(args: argparse.Namespace) -> int:
    from fanlora.stages.search import run_search

    cfg = prepared(args, _stage_config(args), "search")
    run_search(cfg, Path(args.run_dir))
    return 0


def score(args: argparse.Namespace) -> int:
    from fanlora.stages import score as stage

    cfg = _stage_config(args)
    shard = parse_shard(args.shard) if args.shard else None
    cfg = prepared(args, cfg, "score")
    if shard is None:
        stage.run_score(cfg, Path(args.run_dir))
    else:
        stage.run_score_shard(cfg, Path(args.run_dir), shard)
    return 0


def demo(args: argparse.Namespace) -> int:
    from fanlora import report
    from fanlora.stages.demo import run_demo

    cfg = prepared(args, _stage_config(args, "demo"), "demo")
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
    from fanlora.stages import score as stage

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

    cfg = prepared(args, _stage_config(args), "stability")
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


def _method_options(items: list[str]) -> dict:
    """--option KEY=VALUE pairs; a value is read as JSON when it parses (8, 0.1, ["O","D"]), else as text."""
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. --option r=8")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def _finetune_plan(args: argparse.Namespace):
    """The method, its options and the setting `finetune` trains on: all checked before any directory exists."""
    from fanlora import methods
    from fanlora.setting import Setting
    from fanlora.stages.finetune import Plan

    method = methods.get(args.method)  # an unknown method: one line listing the registered ones
    options = _method_options(args.option)
    methods.check_options(args.method, options)
    if args.setting is None and method.needs_setting:
        raise UserError(f"method {args.method} trains on a setting's modules: pass --setting setting.json")
    setting = Setting.read(args.setting) if args.setting else None
    return Plan(args.method, options, setting, args.setting)


def finetune(args: argparse.Namespace) -> int:
    from fanlora.stages import evaluate
    from fanlora.stages.finetune import finetune as run_finetune
    from fanlora.tasks import get_task

    plan = _finetune_plan(args)  # reads the setting (once): its backbone is the default one
    default_backbone = plan.setting.backbone.get("source") if plan.setting else None
    cfg = config_for(args, default_backbone=default_backbone)
    if args.task:
        cfg.finetune.task = args.task
    data = apply_eval_options(args, cfg)
    if data:  # --data replaces the task's training splits too
        cfg.finetune.data = {**(cfg.finetune.data or {}), **data}
    evaluate.decoding_of(cfg)
    get_task(cfg.finetune.task, cfg.finetune.data)  # unknown task or split: say so before any work
    args.run_dir = args.run_dir or f"runs/{cfg.finetune.task}"
    inputs = {"setting_sha256": plan.setting.sha256} if plan.setting else {}
    if plan.method != "fanlora":  # runs made before --method existed are FanLoRA's and record no method
        inputs["method"] = plan.method
    cfg = prepared(args, cfg, "finetune", inputs)
    run_finetune(cfg, plan, args.run_dir)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from fanlora.stages import evaluate as stage

    cfg = config_for(args, default_backbone=adapter_backbone(args))
    if args.split:
        cfg.evaluate.split = args.split
    if args.limit is not None:
        cfg.evaluate.limit = args.limit
    apply_eval_options(args, cfg)
    stage.decoding_of(cfg)
    tasks = list(dict.fromkeys(args.task))
    outs = []
    for name in tasks:
        if args.out:
            outs.append(Path(args.out) / name if len(tasks) > 1 else Path(args.out))
        else:
            outs.append(Path(args.adapter).parent / f"eval-{name}" if args.adapter else Path(f"runs/eval-{name}-base"))
    stage.run_evaluate_many(cfg, tasks, outs, adapter=args.adapter)
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

    serving_bench.run(
        args.setting, args.backbone, args.prompt_tokens, args.new_tokens, args.rounds, args.tenants, say,
        dtype=args.dtype, device=args.device,
    )  # fmt: skip
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
        from fanlora.latency.vllm_server import vllm_python

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
        args.dtype,
        args.device,
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
    where = (args.dtype, args.device)
    run_server(args.setting, args.adapter_dir, args.backbone, args.host, args.port, key, limits, *where)
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
