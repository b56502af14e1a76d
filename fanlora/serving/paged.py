"""A paged KV pool for packed forwards: every row's keys and values in blocks of one shared tensor per layer.

The continuous scheduler runs one forward per iteration that carries every decoding row's next token *and* the
joining prompts' prefill chunks, flattened into a single sequence of T new tokens (no padding). Attention then
needs each new token to see exactly its own row's earlier tokens. This pool gives each row a list of blocks of
``block`` token positions in one ``[kv_heads, capacity, head_dim]`` tensor per layer; a forward is *planned*
first (which pool position each new token is written to, which positions are read, and the ``[T, K]`` mask that
lets a token attend only to its own row's positions up to its own), then the model's attention layers call
:meth:`PagedKV.update` exactly as they call a ``transformers`` cache: the new keys and values are written in
place and the read positions are gathered for attention (SDPA with the 4-D mask, which ``create_causal_mask``
passes through unchanged). Joining and leaving rows move nothing: a leaving row's blocks go back to the free
list, a joining row takes free blocks.

Why our own: ``transformers``' ``PagedAttentionCache`` does the same index-based update, but it is built around
its ``ContinuousBatchingManager``'s request states, scheduler and allocators (see
:mod:`fanlora.serving.continuous` for why that manager is not used), and its ``DynamicCache`` is dense per batch:
a joining row there means re-padding and concatenating every layer's cache. This is the index part alone,
driven by our scheduler, with the engine's per-token adapter routing unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch


def block_bytes(config: Any, dtype: torch.dtype, block: int = 16) -> int:
    """Bytes of one block of every layer's keys and values for a model of ``config`` in ``dtype``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * block * torch.finfo(dtype).bits // 8


def give_back_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps them: after a large block is freed its mmap threshold
    rises, later pools come from the heap, and a dropped pool's pages stay in the RSS (measured: +30 % RSS idle
    after bursts, ``benchmarks/results/burst.txt``). ``malloc_trim(0)`` releases them; elsewhere this does nothing."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def default_cache_mb() -> float:
    """`fanlora serve`'s --kv-cache-mb when not given: an eighth of the machine's memory."""
    import psutil

    return psutil.virtual_memory().total / 8 / 2**20


INITIAL_BLOCKS = 64  # a new pool's blocks; it doubles from there as rows need more


class KVFull(RuntimeError):
    """The pool is at ``max_blocks`` and has no free block left: the scheduler preempts a row and retries."""


class PagedKV:
    """Per-layer block pools, per-row block lists, and the plan of the next forward.

    ``max_blocks`` bounds the pool (`fanlora serve --kv-cache-mb`): it grows by doubling up to that many blocks
    and no further; a reservation past it raises :class:`KVFull` before anything is changed."""

    is_compileable = False
    is_sliding = False

    def __init__(self, block: int = 16, blocks: int = INITIAL_BLOCKS, max_blocks: int | None = None) -> None:
        if block < 1 or blocks < 1 or (max_blocks is not None and max_blocks < 1):
            raise ValueError(f"paged KV: block ({block}), blocks ({blocks}) and max_blocks must be ≥ 1")
        blocks = min(blocks, max_blocks) if max_blocks is not None else blocks
        self.block, self.capacity, self.max_blocks = block, blocks, max_blocks
        self.free = list(range(blocks))
        self.tables: dict[Hashable, list[int]] = {}
        self.keys: list[torch.Tensor] = []  # per layer [kv_heads, capacity·block, head_dim], made at first write
        self.values: list[torch.Tensor] = []
        self._write = self._read = None

    # --- blocks -----------------------------------------------------------------------------------------------
    def available(self) -> int:
        """Blocks that can still be handed out: free ones and the pool's room to grow."""
        room = float("inf") if self.max_blocks is None else self.max_blocks - self.capacity
        return len(self.free) + room

    def blocks_for(self, length: int) -> int:
        """Blocks that hold ``length`` positions."""
        return -(-length // self.block)

    def missing(self, row: Hashable, length: int) -> int:
        """Blocks ``row`` still needs to hold ``length`` positions."""
        return max(0, self.blocks_for(length) - len(self.tables.get(row, [])))

    def _reserve(self, row: Hashable, length: int) -> list[int]:
        need = self.missing(row, length)
        if need > self.available():
            raise KVFull(f"{need} more KV blocks needed, {len(self.free)} free of at most {self.max_blocks}")
        table = self.tables.setdefault(row, [])
        if need > len(self.free):
            grow = max(self.capacity, need - len(self.free))
            self._grow(grow if self.max_blocks is None else min(grow, self.max_blocks - self.capacity))
        for _ in range(need):
            table.append(self.free.pop())
        return table

    def _grow(self, extra: int) -> None:
        """Add ``extra`` blocks (rare: the pool doubles), copying the pools once."""
        start = self.capacity
        self.capacity += extra
        self.free = list(range(start, self.capacity))[::-1] + self.free
        add = extra * self.block
        for pools in (self.keys, self.values):
            for i, pool in enumerate(pools):
                pools[i] = torch.cat([pool, pool.new_zeros(pool.shape[0], add, pool.shape[2])], 1)

    def _pools(self, layer: int, like: torch.Tensor) -> None:
        """Make ``layer``'s pools at its first write, shaped and typed like its keys [1, heads, T, dim]."""
        if layer == len(self.keys):
            size = (like.shape[1], self.capacity * self.block, like.shape[3])
            self.keys.append(like.new_zeros(size))
            self.values.append(like.new_zeros(size))

    def release(self, row: Hashable) -> None:
        """Give ``row``'s blocks back (the row left)."""
        self.free.extend(self.tables.pop(row, []))

    def index(self, row: Hashable, start: int, stop: int) -> torch.Tensor:
        """Pool positions of ``row``'s token positions [start, stop) (blocks reserved as needed)."""
        table = torch.tensor(self._reserve(row, stop), dtype=torch.long)
        pos = torch.arange(start, stop)
        return table[pos // self.block] * self.block + pos % self.block

    # --- one forward ------------------------------------------------------------------------------------------
    def plan(self, segments: Sequence[tuple[Hashable, int, int]]) -> torch.Tensor:
        """Plan a forward of ``segments`` — (row, tokens already in the pool, new tokens), in the order their
        new tokens are packed — and return its attention mask [1, 1, T, K] (True: may attend)."""
        writes, reads, q_row, q_pos, k_row, k_pos = [], [], [], [], [], []
        for i, (row, past, new) in enumerate(segments):
            writes.append(self.index(row, past, past + new))
            reads.append(self.index(row, 0, past + new))
            q_row.append(torch.full((new,), i))
            q_pos.append(torch.arange(past, past + new))
            k_row.append(torch.full((past + new,), i))
            k_pos.append(torch.arange(past + new))
        self._write, self._read = torch.cat(writes), torch.cat(reads)
        same = torch.cat(q_row)[:, None] == torch.cat(k_row)[None, :]
        causal = torch.cat(k_pos)[None, :] <= torch.cat(q_pos)[:, None]
        return (same & causal)[None, None]

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What an attention layer calls: write the new keys/values [1, heads, T, dim] at the planned positions
        and return every planned read position's [1, heads, K, dim]."""
        self._pools(layer, key)
        write, read = self._write.to(key.device), self._read.to(key.device)
        self.keys[layer].index_copy_(1, write, key[0])
        self.values[layer].index_copy_(1, write, value[0])
        return self.keys[layer].index_select(1, read)[None], self.values[layer].index_select(1, read)[None]

    # --- the prefix cache's side ------------------------------------------------------------------------------
    def put(self, row: Hashable, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Write cached prefix KV (per layer [1, heads, n, dim]) as ``row``'s first n positions."""
        at = self.index(row, 0, keys[0].shape[2]).to(keys[0].device)
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self._pools(layer, k)
            self.keys[layer].index_copy_(1, at, k[0])
            self.values[layer].index_copy_(1, at, v[0])

    def get(self, row: Hashable, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``row``'s first n positions' KV, per layer [1, heads, n, dim] (for the prefix cache to keep)."""
        at = self.index(row, 0, n).to(self.keys[0].device)
        return [k.index_select(1, at)[None] for k in self.keys], [v.index_select(1, at)[None] for v in self.values]

    def __len__(self) -> int:  # some models ask a cache for its layer count
        return len(self.keys)
