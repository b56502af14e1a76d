"""How much of the validation set to cache at once, and how many ablations to batch together.

The exact engine caches, per validation batch, the hidden state entering every layer under M_all and
M_null: 2·L·rows·T·H numbers. On a 7B model and a thousand 1k-token examples that is a terabyte, so the
validation batches are processed in chunks whose caches fit in half the memory limit (the scores are
sums over tokens, so chunking changes no number); the other half bounds the activations of the batched
ablation passes. The estimates are deliberately coarse (they over-count) — they only pick sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PretrainedConfig

from fanlora.scoring.replay import Batch


def default_limit(device: torch.device) -> int:
    """A quarter of the GPU's memory on a GPU, else a quarter of the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    import psutil

    return psutil.virtual_memory().total // 4


def _dims(config: PretrainedConfig) -> tuple[int, int, int, int, int]:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = c.hidden_size
    inter = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * hidden
    return c.num_hidden_layers, hidden, inter, c.num_attention_heads, c.vocab_size


def cache_bytes(config: PretrainedConfig, batch: Batch, elem: int) -> int:
    layers, hidden, *_ = _dims(config)
    return 2 * layers * batch.tokens * hidden * elem


def pass_bytes(config: PretrainedConfig, batch: Batch, replicas: int, elem: int) -> int:
    """Peak activations of one forward of ``replicas`` copies of ``batch`` (one layer's worth + logits)."""
    _, hidden, inter, heads, vocab = _dims(config)
    tokens = batch.tokens * replicas
    seq = batch.input_ids.shape[1]
    layer = tokens * (3 * inter + 10 * hidden) * elem + batch.rows * replicas * heads * seq * seq * elem
    return layer + batch.n_scored * replicas * vocab * 4 * 2


def plan_chunks(config: PretrainedConfig, batches: Sequence[Batch], limit: int, elem: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) batch ranges whose caches fit in half of ``limit`` (at least one batch each)."""
    chunks, start, used = [], 0, 0
    for i, b in enumerate(batches):
        need = cache_bytes(config, b, elem)
        if i > start and used + need > limit // 2:
            chunks.append((start, i))
            start, used = i, 0
        used += need
    chunks.append((start, len(batches)))
    return chunks


# On a CPU, wide batches stop paying early: on SmolLM2 (2 cores) a pass of 1 280 or 2 560 tokens cost 1.13 s
# per 640-token replica, one of 8 960 tokens 1.90 s (cache misses). GPUs keep gaining; memory bounds them.
CPU_TOKENS_PER_PASS = 3072


def group_size(
    config: PretrainedConfig, batches: Sequence[Batch], n_kinds: int, limit: int, elem: int, on_cpu: bool
) -> int:
    """How many kinds of one layer to ablate in one batched pass (2 replicas each: without and only)."""
    largest = max(batches, key=lambda b: b.tokens)
    for g in range(n_kinds, 0, -1):
        fits = pass_bytes(config, largest, 2 * g, elem) <= limit // 2
        if fits and (not on_cpu or 2 * g * largest.tokens <= CPU_TOKENS_PER_PASS):
            return g
    return 1
