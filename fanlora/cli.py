"""``fanlora <command>``: the argument parser; each subcommand is bound to its handler in :mod:`fanlora.commands`.

Bad input surfaces as :class:`fanlora.errors.UserError`: one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fanlora import __version__, commands, dist
from fanlora.config import R1, cli_flags
from fanlora.errors import UserError
from fanlora.serving import export
from fanlora.serving.flags import add_serve_flags


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
        p.set_defaults(writes_run=True)
        p.add_argument("--run-dir", default=run_dir, help=f"run directory (default {run_dir})")
        p.add_argument("--resume", action="store_true", help="continue a run with its stored config")
        p.add_argument("--overwrite", action="store_true", help="delete the run directory's previous run first")


def _config_flags(p: argparse.ArgumentParser, section: str) -> None:
    """The section's config values that are flags too; options, types, choices and help come from the fields."""
    for f in cli_flags(section):
        p.add_argument(f.flag, dest=f.dest, type=f.type, choices=f.choices, help=f.help,
                      metavar=None if f.choices else f.key.upper())  # fmt: skip
        for old in f.deprecated:  # still accepted, with a warning; not in --help
            p.add_argument(old, dest=f.dest, type=f.type, choices=f.choices, help=argparse.SUPPRESS,
                          action=_deprecated(old, f.flag))  # fmt: skip


def _deprecated(old: str, new: str) -> type[argparse.Action]:
    class Deprecated(argparse.Action):
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
            print(f"warning: {old} is deprecated here: use {new}", file=sys.stderr, flush=True)
            setattr(namespace, self.dest, values)

    return Deprecated


def _score_options(p: argparse.ArgumentParser) -> None:
    """score's flags; --scorer's help lists the registered scorers (the CLI adds them: config stays static)."""
    from fanlora.scoring import scorers  # declarations only: no torch

    _config_flags(p, "score")
    for action in p._actions:
        if "--scorer" in action.option_strings:
            action.help = action.help.replace("stage-b scorer", f"stage-b scorer — {scorers.described()}", 1)


def _tasks() -> str:
    from fanlora.tasks import known_tasks  # light: a task's torch work is imported when it runs

    return ", ".join(known_tasks())


def _methods() -> str:
    from fanlora.methods import registry  # the package imports every method file: names only, no training

    return ", ".join(registry.names())


def _data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="SPLIT=SOURCE",
        help="replace a split's data: a .jsonl/.jsonl.gz file or an HF dataset NAME[:CONFIG][@SPLIT] (repeatable)",
    )


def _eval_options(p: argparse.ArgumentParser) -> None:
    _config_flags(p, "evaluate")


def _method_parsers(sub: Any) -> None:
    """Stages a–c and the score files."""
    p = sub.add_parser("search", help="stage a: LoRA on every module, fine-tuned on instruction data")
    p.set_defaults(func=commands.search)
    _common(p, "runs/fanlora")
    p = sub.add_parser("score", help="stage b: score every (module, layer): exact AB-score or another method")
    p.set_defaults(func=commands.score)
    _common(p, "runs/fanlora")
    _score_options(p)
    p.add_argument("--shard", help="compute shard I of N only (e.g. 0/4) → a shard file for `fanlora scores merge`")

    p = sub.add_parser("scores", help="work with score files: compare them, merge shards")
    ssub = p.add_subparsers(dest="scores_command", required=True)
    q = ssub.add_parser("compare", help="Spearman ρ, Kendall τ and setting overlap between score files")
    q.set_defaults(func=commands.scores_compare)
    q.add_argument("files", nargs="+", help="two or more scores*.json of one backbone")
    q.add_argument("--k-max", type=int, default=2, help="K_max of the settings whose overlap is reported")
    q.add_argument("--out", help="also write the matrices to this JSON file")
    q = ssub.add_parser("merge", help="one scores.json from the shard files of `fanlora score --shard I/N`")
    q.set_defaults(func=commands.scores_merge)
    q.add_argument("files", nargs="+", help="every shard file of the study")
    q.add_argument("--out", required=True, help="the merged scores file, e.g. runs/x/scores.json")

    p = sub.add_parser("compare", help="two evaluations (or grid cells) of one task, paired item by item")
    p.set_defaults(func=commands.compare)
    p.add_argument("a", help="a folder with items.jsonl: `fanlora evaluate --out`'s, or a grid cell's")
    p.add_argument("b", help="the other folder, evaluated on the same items")
    p.add_argument("--metric", default="value", choices=["value", "gold_nll"],
                   help="value: the task's per-item score (higher is better); gold_nll: gold-answer loss")  # fmt: skip
    p.add_argument("--out", help="also write the comparison to this JSON file")

    p = sub.add_parser("stability", help="stage a + scoring under several seeds, then their Spearman matrix")
    p.set_defaults(func=commands.stability)
    _common(p, "runs/stability")
    _score_options(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="stage-a seeds (default 0 1 2)")
    p.add_argument(
        "--split-half",
        action="store_true",
        help="instead: one stage-a run (the first seed) scored on two disjoint halves of the val examples, "
        "score.max_val_examples each — the scoring noise alone",
    )

    p = sub.add_parser("select", help="stage c: keep the top K_max modules per layer → setting.json")
    p.set_defaults(func=commands.select)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", help="scores.json from `fanlora score`")
    src.add_argument("--run-dir", help="a run directory holding scores.json")
    p.add_argument(
        "--k-max", type=int, help="modules kept per layer at most (default 2, the paper's; with --budget: no cap)"
    )
    p.add_argument(
        "--budget",
        help="choose the modules maximising the summed score within a budget: params=N (trainable parameters "
        "at rank --r1, e.g. params=1M) or latency=P%% (decode slowdown, from `fanlora profile`)",
    )
    p.add_argument("--r1", type=int, default=R1, help=f"stage-d LoRA rank a params budget is costed at (default {R1})")
    p.add_argument("--profile", help="latency profile (default: this backbone's cached `fanlora profile`)")
    p.add_argument(
        "--engine",
        choices=["fanlora", "vllm"],
        default="fanlora",
        help="what a latency budget costs: fanlora (default; also vLLM with the fanlora-vllm plugin) per module, "
        "or vllm: stock vLLM, per packed projection kind in every layer (`fanlora profile --engine vllm`)",
    )
    p.add_argument("--out", help="setting path (default: setting.json next to the scores)")
    p.add_argument("--backbone", help="the backbone the setting is for; scores of another one are refused")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def _task_parsers(sub: Any) -> None:
    """Stage d, evaluation and MT-Bench judging."""
    p = sub.add_parser("finetune", help="stage d: fresh LoRA on the setting's modules (or a baseline), on a task")
    p.set_defaults(func=commands.finetune, writes_run=True)
    _common(p, None)
    p.add_argument("--setting", help="setting.json from `fanlora select` (needed by fanlora; sizes ssp's budget)")
    p.add_argument("--method", default="fanlora", help=f"training method ({_methods()}; default fanlora)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --option r=8 (repeatable; values are JSON or text)")  # fmt: skip
    p.add_argument("--task", help=f"task name ({_tasks()}); default from the config")
    p.add_argument("--run-dir", help="output directory (default runs/<task>)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    _data_option(p)
    _eval_options(p)

    p = sub.add_parser("evaluate", help="evaluate the base model or an adapter on one or more tasks")
    p.set_defaults(func=commands.evaluate)
    _common(p, None)
    p.add_argument("--task", required=True, action="append", help=f"task name ({_tasks()}); repeatable")
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
    p.set_defaults(func=commands.judge)
    p.add_argument("--answers", required=True, help="directory of `fanlora evaluate --task mtbench` (answers)")
    p.add_argument("--against", help="a second answers directory: pairwise comparison instead of grading")
    p.add_argument("--judge-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", required=True, help="the judge's model name at that endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--out", help="output directory (default: the answers directory, or <answers>/pairwise-…)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server: one backbone, many FanLoRA adapters, mixed batches")
    p.set_defaults(func=commands.serve, own_threads=True)
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
    _placement_flags(p)
    add_serve_flags(p)


def _placement_flags(p: argparse.ArgumentParser) -> None:
    """Where the backbone runs, for the commands that time or serve it (training takes these from its recipe)."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--device", default="auto", help="auto (default: the first GPU if any, else CPU), cpu, cuda:N")


def _serving_parsers(sub: Any) -> None:
    _serve_parser(sub)

    p = sub.add_parser("export", help="the setting for engines without fanlora: vLLM/SGLang flags, a PEFT LoraConfig")
    p.set_defaults(func=export.command)
    p.add_argument("--setting", required=True, help="setting.json from `fanlora select`")
    p.add_argument("--engine", required=True, choices=export.ENGINES)
    p.add_argument("--r", type=int, default=R1, help=f"LoRA rank of the PEFT config (default {R1}, stage d's)")
    p.add_argument("--alpha", type=float, default=2 * R1, help=f"its lora_alpha (default {2 * R1})")
    p.add_argument("--out", help="write it to this file (default: print it)")

    p = sub.add_parser("bench", help="Table 3 on this machine: decode speed and memory of FanLoRA vs baselines")
    p.set_defaults(func=commands.bench)
    p.add_argument("--setting", required=True, help="the backbone's setting.json")
    p.add_argument("--backbone", help="default: the backbone the setting was made for")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (the median is reported)")
    p.add_argument("--prompt-tokens", type=int, default=276)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tenants", type=int, default=16, help="distinct adapters in the multi-tenant batch")
    p.add_argument("--out", help="also write the report to this file (e.g. benchmarks/results/serving.txt)")
    _placement_flags(p)

    p = sub.add_parser("profile", help="decode cost of LoRA on each module kind, for latency budgets (cached)")
    p.set_defaults(func=commands.profile)
    p.add_argument("--backbone", default="embedded", help="model to profile (default: the embedded backbone)")
    p.add_argument("--r", type=int, default=R1, help=f"LoRA rank profiled (default {R1}, stage d's)")
    p.add_argument("--rounds", type=int, default=30, help="balanced rounds (the median ratio is used)")
    p.add_argument("--prompt-tokens", type=int, default=276, help="the decode steps' position (cache length)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timed run")
    p.add_argument("--out", help="also write the profile here (it always goes to the cache, where select finds it)")
    _placement_flags(p)
    p.add_argument(
        "--engine",
        choices=["fanlora", "vllm"],
        default="fanlora",
        help="fanlora (default): this engine's decode step per module kind; vllm: stock vLLM's server throughput "
        "per packed kind (needs `bash scripts/setup-vllm.sh`; --rounds/--steps/--prompt-tokens do not apply)",
    )


def _grid_parsers(sub: Any) -> None:
    p = sub.add_parser("experiment", help="a grid of runs (methods × tasks × seeds × variants), resumable")
    p.set_defaults(func=commands.experiment)
    p.add_argument("config", help="experiment YAML (see configs/experiments/)")
    p.add_argument("--resume", action="store_true", help="continue the grid this config made before")
    p.add_argument("--shard", help="I/N: run every N-th cell starting at I (several processes share a grid)")
    p.add_argument("--list", action="store_true", help="list the cells and whether each is done; run nothing")
    p.add_argument("--cells", nargs="+", metavar="GLOB", help="run only cells whose id matches, e.g. 'copa__*'")
    p.add_argument("--aggregate", action="store_true", help="only rebuild the tables from the finished cells")

    p = sub.add_parser("report", help="one self-contained HTML page showing a run (open it from disk)")
    p.set_defaults(func=commands.report)
    p.add_argument("run_dir", help="a run directory (search/score/select/demo)")
    p.add_argument("--out", help="page path (default: RUN_DIR/report.html)")

    p = sub.add_parser("demo", help="the whole method on the embedded backbone, then COPA before/after")
    p.set_defaults(func=commands.demo)
    _common(p, "runs/demo")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where the options are (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (options: {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fanlora", description="FanLoRA: find where LoRA should go, then adapt.")
    parser.add_argument("--version", action="version", version=f"fanlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for add in (_method_parsers, _task_parsers, _serving_parsers, _grid_parsers):
        add(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    """The command's handler; a command that writes a run directory (``writes_run``) leaves none behind that
    it made and failed in."""
    from fanlora.stages.rundir import discarded_if_fresh

    with discarded_if_fresh(args.run_dir if getattr(args, "writes_run", False) else None):
        return args.func(args)


def _quiet_libraries() -> None:
    """Keep stderr for what matters: no weight-loading bars, no deprecation noise from our dependencies."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    _quiet_libraries()
    try:
        if not getattr(args, "own_threads", False):  # serve sizes its team itself, after checking its flags
            dist.configure_threads()
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # a full disk, a read-only folder, a missing permission: the path and what to do
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}: free disk space or fix permissions, then re-run",
              file=sys.stderr, flush=True)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr, flush=True)
        return 130
