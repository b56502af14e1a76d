"""``fanlora <command>``: parse arguments, call one library function, print where the results went.

Bad input surfaces as :class:`fanlora.errors.UserError`: one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from fanlora import __version__
from fanlora.config import Config, check_values, load_config
from fanlora.errors import UserError

SECTIONS = {
    "search": ["backbone", "search"],
    "score": ["backbone", "search", "score"],
    "stability": ["backbone", "search", "score", "select"],
    "finetune": ["backbone", "finetune", "evaluate"],
    "demo": ["backbone", "search", "score", "select", "finetune", "evaluate"],
}


def _common(p: argparse.ArgumentParser, run_dir: str | None) -> None:
    p.add_argument("--config", help="YAML recipe: a path, or a bundled name (demo, paper)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set search.train.max_steps=20 (repeatable)",
    )
    p.add_argument("--backbone", help="shortcut for --set backbone.name=...: 'embedded', HF id, directory or .gguf")
    p.add_argument("--module-map", help="kind→path map for unrecognised architectures: 'Q=self_attn.q_proj,...'")
    if run_dir is not None:
        p.add_argument("--run-dir", default=run_dir, help=f"run directory (default {run_dir})")
        p.add_argument("--resume", action="store_true", help="continue a run with its stored config")
        p.add_argument("--overwrite", action="store_true", help="delete the run directory's previous run first")


def _score_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="ab-exact (default, the paper's), ab-first-order, sensitivity or shapley")
    p.add_argument("--budget", type=int, help="shapley: permutations to sample (config score.shapley_budget)")
    p.add_argument("--seed", type=int, help="shapley: seed of the sampled permutations")
    p.add_argument("--memory-limit-gb", type=float, help="cache budget (default: a quarter of RAM / GPU memory)")


TASKS = "copa, boolq, mmlu, squad, gsm8k, sql, mtbench"


def _data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="SPLIT=SOURCE",
        help="replace a split's data: a .jsonl/.jsonl.gz file or an HF dataset NAME[:CONFIG][@SPLIT] (repeatable)",
    )


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode", choices=["auto", "loglik", "generate"], help="multiple choice: loglik (default) or generate"
    )
    p.add_argument(
        "--mc-format",
        choices=["clean", "lm-eval"],
        help="multiple-choice text: clean (default: one space before each choice) or lm-eval (stock "
        "lm-evaluation-harness 0.4, item for item)",
    )
    p.add_argument("--decoding", choices=["greedy", "sampling", "beam"], help="default greedy")
    p.add_argument("--num-beams", type=int, help="beam search width (default 3, the paper's)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, help="sampling nucleus (default 0.95)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: the task's)")
    p.add_argument("--sample-seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, help="examples per batch (default from the config: 16)")


def _apply_eval_options(args: argparse.Namespace, cfg: Config) -> None:
    ev = cfg.evaluate
    for flag, key in (
        ("mode", "mode"),
        ("mc_format", "mc_format"),
        ("decoding", "decoding"),
        ("num_beams", "num_beams"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("max_new_tokens", "max_new_tokens"),
        ("sample_seed", "seed"),
        ("batch_size", "batch_size"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(ev, key, value)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fanlora", description="FanLoRA: find where LoRA should go, then adapt.")
    parser.add_argument("--version", action="version", version=f"fanlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("search", help="stage a: LoRA on every module, fine-tuned on instruction data")
    _common(p, "runs/fanlora")
    p = sub.add_parser("score", help="stage b: score every (module, layer): exact AB-score or another method")
    _common(p, "runs/fanlora")
    _score_options(p)
    p.add_argument("--shard", help="compute shard I of N only (e.g. 0/4) → a shard file for `fanlora scores merge`")

    p = sub.add_parser("scores", help="work with score files: compare them, merge shards")
    ssub = p.add_subparsers(dest="scores_command", required=True)
    q = ssub.add_parser("compare", help="Spearman ρ, Kendall τ and setting overlap between score files")
    q.add_argument("files", nargs="+", help="two or more scores*.json of one backbone")
    q.add_argument("--k-max", type=int, default=2, help="K_max of the settings whose overlap is reported")
    q.add_argument("--out", help="also write the matrices to this JSON file")
    q = ssub.add_parser("merge", help="one scores.json from the shard files of `fanlora score --shard I/N`")
    q.add_argument("files", nargs="+", help="every shard file of the study")
    q.add_argument("--out", required=True, help="the merged scores file, e.g. runs/x/scores.json")

    p = sub.add_parser("stability", help="stage a + scoring under several seeds, then their Spearman matrix")
    _common(p, "runs/stability")
    _score_options(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="stage-a seeds (default 0 1 2)")

    p = sub.add_parser("select", help="stage c: keep the top K_max modules per layer → setting.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", help="scores.json from `fanlora score`")
    src.add_argument("--run-dir", help="a run directory holding scores.json")
    p.add_argument("--k-max", type=int, default=2, help="modules kept per layer at most (paper: 2)")
    p.add_argument("--out", help="setting path (default: setting.json next to the scores)")
    p.add_argument("--backbone", help="the backbone the setting is for; scores of another one are refused")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")

    p = sub.add_parser("finetune", help="stage d: fresh LoRA on the setting's modules, trained on a task")
    _common(p, None)
    p.add_argument("--setting", required=True, help="setting.json from `fanlora select`")
    p.add_argument("--task", help=f"task name ({TASKS}); default from the config")
    p.add_argument("--run-dir", help="output directory (default runs/<task>)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    _data_option(p)
    _eval_options(p)

    p = sub.add_parser("evaluate", help="evaluate the base model or an adapter on one or more tasks")
    _common(p, None)
    p.add_argument("--task", required=True, action="append", help=f"task name ({TASKS}); repeatable")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--adapter", help="a PEFT adapter directory")
    who.add_argument("--base", action="store_true", help="evaluate the bare backbone")
    p.add_argument("--split", help="dev or test (default from the config: test)")
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument(
        "--out",
        help="output directory (default: <adapter>/../eval-<task> or runs/eval-<task>-base; "
        "with several tasks, one sub-directory per task)",
    )
    _data_option(p)
    _eval_options(p)

    p = sub.add_parser("judge", help="MT-Bench: grade saved answers (1-10) or compare two runs with an LLM judge")
    p.add_argument("--answers", required=True, help="directory of `fanlora evaluate --task mtbench` (answers)")
    p.add_argument("--against", help="a second answers directory: pairwise comparison instead of grading")
    p.add_argument("--judge-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", required=True, help="the judge's model name at that endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--out", help="output directory (default: the answers directory, or <answers>/pairwise-…)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")

    p = sub.add_parser("serve", help="OpenAI-compatible server: one backbone, many FanLoRA adapters, mixed batches")
    p.add_argument("--setting", required=True, help="the backbone's setting.json (every adapter must match it)")
    p.add_argument("--adapter-dir", help="folder with one PEFT adapter folder per name (loaded on first use)")
    p.add_argument("--backbone", help="default: the backbone the setting was made for")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $FANLORA_API_KEY if "
        "set and not empty); an empty key is refused",
    )
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before answering 503")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")

    p = sub.add_parser("bench", help="Table 3 on this machine: decode speed and memory of FanLoRA vs baselines")
    p.add_argument("--setting", required=True, help="the backbone's setting.json")
    p.add_argument("--backbone", help="default: the backbone the setting was made for")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (the median is reported)")
    p.add_argument("--prompt-tokens", type=int, default=276)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tenants", type=int, default=16, help="distinct adapters in the multi-tenant batch")
    p.add_argument("--out", help="also write the report to this file (e.g. benchmarks/results/serving.txt)")

    p = sub.add_parser("experiment", help="a grid of runs (methods × tasks × seeds × variants), resumable")
    p.add_argument("config", help="experiment YAML (see configs/experiments/)")
    p.add_argument("--resume", action="store_true", help="continue the grid this config made before")
    p.add_argument("--shard", help="I/N: run every N-th cell starting at I (several processes share a grid)")
    p.add_argument("--list", action="store_true", help="list the cells and whether each is done; run nothing")
    p.add_argument("--cells", nargs="+", metavar="GLOB", help="run only cells whose id matches, e.g. 'copa__*'")
    p.add_argument("--aggregate", action="store_true", help="only rebuild the tables from the finished cells")

    p = sub.add_parser("demo", help="the whole method on the embedded backbone, then COPA before/after")
    _common(p, "runs/demo")
    return parser


def _setting_backbone(args: argparse.Namespace) -> str | None:
    """The backbone a setting (or an adapter's copy of it) was made for: the default for finetune/evaluate."""
    path = getattr(args, "setting", None) or (
        Path(args.adapter) / "setting.json" if getattr(args, "adapter", None) else None
    )
    if path is None or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())["backbone"]["source"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # Setting.read() reports a broken file properly later


def _config(args: argparse.Namespace, stored_dir: Path | None = None) -> Config:
    overrides = list(args.overrides)
    backbone = getattr(args, "backbone", None)
    if backbone is None and args.config is None and args.command in ("finetune", "evaluate"):
        backbone = _setting_backbone(args)
    if backbone:
        overrides.insert(0, f"backbone.name={json.dumps(backbone)}")
    if getattr(args, "module_map", None):
        overrides.insert(0, f"backbone.module_map={json.dumps(args.module_map)}")
    for flag, key in (("method", "method"), ("budget", "shapley_budget"), ("seed", "seed")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"score.{key}={json.dumps(getattr(args, flag))}")
    if getattr(args, "memory_limit_gb", None) is not None:
        import yaml

        # YAML reads "1e-09" as a string; its own float spelling round-trips
        overrides.append(f"score.memory_limit_gb={yaml.safe_dump(args.memory_limit_gb).splitlines()[0]}")
    source = args.config
    if source is None and args.command == "demo":
        source = "demo"
    elif source is None and stored_dir is not None and not getattr(args, "overwrite", False):
        # later stages of a run reuse the config its first stage stored
        meta = stored_dir / "run.json"
        if meta.is_file():
            source = json.loads(meta.read_text()).get("config")
            if isinstance(source, dict):
                from fanlora.rundir import PER_COMMAND

                # which scorer the last command ran is not part of the run: --method etc. default afresh
                for key in PER_COMMAND:
                    section, name = key.split(".")
                    source.get(section, {}).pop(name, None)
    return load_config(source, overrides)


def _prepared(
    args: argparse.Namespace, cfg: Config, run_dir: Path, sections: list[str], inputs: dict[str, str] | None = None
) -> Config:
    from fanlora import rundir

    def prep() -> dict:
        return rundir.prepare(run_dir, cfg.to_dict(), sections, args.resume, args.overwrite, inputs)

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
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


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise UserError(f"--shard {text!r} is not I/N with 0 <= I < N: e.g. --shard 0/4 ... --shard 3/4")
    return i, n


def _intended_backbone(args: argparse.Namespace) -> dict | None:
    """For `select`: the identity of --backbone if given, else of the run's own stage-a backbone."""
    if args.backbone:
        from fanlora.backbone import load_backbone

        return load_backbone(args.backbone).identity
    if args.run_dir:
        metrics = Path(args.run_dir) / "search" / "metrics.json"
        if metrics.is_file():
            return json.loads(metrics.read_text()).get("backbone")
    return None


def _discard_if_fresh(run_dir: Path) -> None:
    """After bad input on a new run, leave no directory behind that holds only our run.json."""
    if run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == ["run.json"]:
        shutil.rmtree(run_dir)


def run(args: argparse.Namespace) -> int:
    run_dir = (
        Path(args.run_dir) if getattr(args, "run_dir", None) and args.command not in ("select", "scores") else None
    )
    fresh = run_dir is not None and not (run_dir / "run.json").exists()
    try:
        return _run(args)
    except UserError:
        if fresh and int(os.environ.get("RANK", "0")) == 0:
            _discard_if_fresh(run_dir)
        raise


def _run(args: argparse.Namespace) -> int:
    from fanlora import pipeline

    cmd = args.command
    if cmd in ("search", "score", "demo"):
        run_dir = Path(args.run_dir)
        cfg = _config(args, run_dir)
        from fanlora.scoring.study import check_method

        check_method(cfg.score.method, cfg.score.shapley_budget)  # before any directory is touched
        shard = _shard(args.shard) if cmd == "score" and args.shard else None
        cfg = _prepared(args, cfg, run_dir, SECTIONS[cmd])
        if cmd == "search":
            pipeline.run_search(cfg, run_dir)
        elif cmd == "score":
            pipeline.run_score(cfg, run_dir, shard=shard)
        else:
            s = pipeline.run_demo(cfg, run_dir)
            t = s["task"]
            print(
                f"RESULT run_dir={s['run_dir']} minutes={s['minutes']:.2f} modules_kept={s['modules_kept']} "
                f"{t}_acc_base={s[f'{t}_acc_base']:.4f} {t}_acc_fanlora={s[f'{t}_acc_fanlora']:.4f}",
                flush=True,
            )
        return 0
    if cmd == "select":
        scores = Path(args.scores) if args.scores else Path(args.run_dir) / "scores.json"
        out = Path(args.out) if args.out else scores.parent / "setting.json"
        pipeline.run_select(
            scores, args.k_max, out, None if args.no_plots else out.parent / "plots", _intended_backbone(args)
        )
        return 0
    if cmd == "scores":
        if args.scores_command == "merge":
            pipeline.merge_shards(args.files, args.out)
            return 0
        from fanlora.scoring.compare import compare_files

        result = compare_files(args.files, args.k_max)
        print(result.markdown())
        if args.out:
            from fanlora import atomic

            atomic.write_json(args.out, result.to_dict())
        return 0
    if cmd == "stability":
        run_dir = Path(args.run_dir)
        cfg = _config(args, run_dir)
        from fanlora.scoring.study import check_method

        check_method(cfg.score.method, cfg.score.shapley_budget)
        cfg = _prepared(args, cfg, run_dir, SECTIONS[cmd])
        result = pipeline.run_stability(cfg, run_dir, args.seeds)
        print(result.markdown())
        off = [result.spearman[i][j] for i in range(len(args.seeds)) for j in range(len(args.seeds)) if i != j]
        print(f"RESULT seeds={len(args.seeds)} spearman_min={min(off):.4f} spearman_max={max(off):.4f}", flush=True)
        return 0
    if cmd == "finetune":
        cfg = _config(args)
        if args.task:
            cfg.finetune.task = args.task
        _apply_eval_options(args, cfg)
        pipeline.decoding_of(cfg)
        from fanlora.tasks import get_task

        get_task(cfg.finetune.task, cfg.finetune.data)  # unknown task or split: say so before any work
        run_dir = Path(args.run_dir or f"runs/{cfg.finetune.task}")
        setting = Path(args.setting)
        if not setting.is_file():
            raise UserError(f"setting file {setting} does not exist: run `fanlora select` first or fix the path")
        digest = hashlib.sha256(setting.read_bytes()).hexdigest()
        cfg = _prepared(args, cfg, run_dir, SECTIONS["finetune"], {"setting_sha256": digest})
        adapter = pipeline.run_finetune(cfg, args.setting, run_dir)
        pipeline.run_evaluate(cfg, cfg.finetune.task, run_dir, adapter=adapter)
        return 0
    if cmd == "evaluate":
        cfg = _config(args)
        if args.split:
            cfg.evaluate.split = args.split
        if args.limit is not None:
            cfg.evaluate.limit = args.limit
        _apply_eval_options(args, cfg)
        pipeline.decoding_of(cfg)
        tasks = list(dict.fromkeys(args.task))
        outs = []
        for name in tasks:
            if args.out:
                outs.append(Path(args.out) / name if len(tasks) > 1 else Path(args.out))
            else:
                outs.append(
                    Path(args.adapter).parent / f"eval-{name}" if args.adapter else Path(f"runs/eval-{name}-base")
                )
        pipeline.run_evaluate_many(cfg, tasks, outs, adapter=args.adapter)
        return 0
    if cmd == "bench":
        from fanlora import atomic
        from fanlora.serving import bench

        if min(args.rounds, args.prompt_tokens, args.new_tokens, args.tenants) < 1:
            raise UserError("--rounds, --prompt-tokens, --new-tokens and --tenants must be ≥ 1")
        lines: list[str] = []

        def say(line: str) -> None:
            print(line, flush=True)
            lines.append(line)

        bench.run(args.setting, args.backbone, args.prompt_tokens, args.new_tokens, args.rounds, args.tenants, say=say)
        if args.out:
            command = "fanlora " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "fanlora bench …"
            atomic.write_text(args.out, f"$ {command}\n" + "\n".join(lines) + "\n")
        return 0
    if cmd == "experiment":
        from fanlora import experiment

        exp = experiment.parse(args.config)
        if args.list:
            for cell in experiment.cells(exp):
                done = (Path(exp.out) / "cells" / cell.id / "cell.json").is_file()
                print(f"{'done' if done else 'todo'}  {cell.id}")
            return 0
        if args.aggregate:
            summary = experiment.aggregate(exp)
            print(f"{summary['cells_done']}/{summary['cells']} cells → {exp.report}/results.md")
            return 0
        shard = (0, 1)
        if args.shard:
            try:
                index, count = (int(v) for v in args.shard.split("/"))
            except ValueError:
                raise UserError(f"--shard {args.shard!r} is not I/N: write e.g. --shard 0/2") from None
            if not 0 <= index < count:
                raise UserError(f"--shard {args.shard}: I must be in 0..N-1")
            shard = (index, count)
        summary = experiment.run(exp, resume=args.resume, shard=shard, only=args.cells)
        print(
            f"RESULT experiment={exp.name} cells_done={summary['cells_done']}/{summary['cells']} "
            f"grid_minutes={summary['grid_minutes']} report={exp.report}/results.md"
        )
        return 0
    if cmd == "serve":
        from fanlora.serving.server import Limits, serve

        serve(
            args.setting,
            args.adapter_dir,
            args.backbone,
            args.host,
            args.port,
            args.api_key if args.api_key is not None else (os.environ.get("FANLORA_API_KEY") or None),
            Limits(max_tokens=args.max_tokens, max_queue=args.max_queue, max_batch=args.max_batch),
        )
        return 0
    if cmd == "judge":
        from fanlora import judge

        judge.run_cli(args)
        return 0
    raise AssertionError(cmd)


def _quiet_libraries() -> None:
    """Keep stderr for what matters: no weight-loading bars, no deprecation noise from our dependencies."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr, flush=True)
        return 130
