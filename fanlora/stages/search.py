"""Stage a: LoRA of rank r0 on every module of every layer, fine-tuned on the instruction corpus.

Writes ``<run>/search/adapter/`` (gated LoRA, PEFT format) and ``<run>/search/metrics.json``; a finished
stage is skipped, an interrupted one resumes from its last complete checkpoint (:mod:`fanlora.train`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fanlora import atomic
from fanlora.backbone import from_config
from fanlora.config import Config
from fanlora.data.instruct import for_search, read_conversations
from fanlora.dist import is_main, say
from fanlora.gates import GatedLoRA
from fanlora.train import train_adapter


def run_search(cfg: Config, run_dir: str | Path) -> Path:
    """Stage a: LoRA (rank r0) on every module of every layer, fine-tuned on the instruction corpus."""
    out = Path(run_dir) / "search"
    adapter = out / "adapter"
    if (adapter / "adapter_config.json").is_file():
        say(f"stage a: done before, adapter at {adapter}")
        return adapter
    conversations = read_conversations(cfg.search.data.sources)  # bad data fails before the model loads
    torch.manual_seed(cfg.search.train.seed)
    backbone = from_config(cfg.backbone)
    data = for_search(cfg.search.data, backbone.tokenizer, conversations)
    say(
        f"stage a: {len(data.train)} train / {len(data.val)} val examples; LoRA r={cfg.search.lora.r} on "
        f"{len(backbone.layout.all_modules())} modules"
    )
    lora = cfg.search.lora
    gated = GatedLoRA.create(backbone.model, backbone.layout, lora.r, lora.alpha, lora.dropout)
    start, cpu = time.time(), time.process_time()
    result = train_adapter(gated.model, data.train, data.val, cfg.search.train, out, backbone.tokenizer.pad_token_id)
    if is_main():
        atomic.write_json(
            out / "metrics.json",
            {
                "steps": result.steps,
                "best_eval_loss": result.best_eval_loss,
                "train_loss": result.train_loss,
                "minutes": (time.time() - start) / 60,
                "cpu_seconds": time.process_time() - cpu,  # this process's, like scores.json's cost
                "n_train": len(data.train),
                "n_val": len(data.val),
                "resumed_from": result.resumed_from,
                "backbone": backbone.identity,
            },
        )
    say(f"stage a: adapter at {result.adapter_dir} (best val loss {result.best_eval_loss})")
    return result.adapter_dir
