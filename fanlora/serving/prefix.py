"""Prefix caching for the continuous scheduler: the KV of prompt prefixes, by adapter and token block.

Chat traffic repeats the chat template's system block in every request, and each request used to prefill it
again. This cache keeps, per adapter *load* (a LoRA on K or V changes the keys and values, so a prefix's KV
belongs to one loaded adapter; requests on the bare backbone share slot 0's), a trie of token blocks of
``block`` tokens: a node holds its block's keys and values for every layer. A prompt that starts with a
cached chain of blocks starts its prefill after them. Memory is bounded (least recently used leaves go
first), and a node is reachable only under the load that made it — a reload writes a fresh slot with a new
load number, so nothing computed under the old weights is reused.

A hit's blocks are copied into the row's blocks of the scheduler's KV pool (:mod:`fanlora.serving.paged`) and
its prefill starts after them; a prompt completed in a forward gives its whole blocks to the cache.

Why our own: ``transformers``' ``DynamicCache`` has no prefix sharing, and its paged cache belongs to its
``ContinuousBatchingManager``, which this scheduler does not use (see :mod:`fanlora.serving.continuous`);
vLLM's block-hash prefix cache is the model, on copies kept beside the pool instead of shared pool blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Node:
    keys: list[torch.Tensor]  # per layer [1, heads, block, dim]
    values: list[torch.Tensor]
    used: int = 0  # the cache's clock at the last hit or store
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PrefixCache:
    """Block-granular prompt-prefix KV by (slot, load), LRU-bounded to ``limit_bytes``."""

    def __init__(self, limit_bytes: int, block: int = 16) -> None:
        if limit_bytes < 0 or block < 1:
            raise ValueError(f"prefix cache: limit ({limit_bytes}) must be ≥ 0 and block ({block}) ≥ 1")
        self.limit, self.block = limit_bytes, block
        self.roots: dict[tuple[int, int], dict[tuple[int, ...], _Node]] = {}
        self.bytes = 0
        self.clock = 0
        self.hits = self.lookups = self.tokens_reused = 0

    def _chunks(self, ids: list[int], n_blocks: int) -> list[tuple[int, ...]]:
        b = self.block
        return [tuple(ids[i * b : (i + 1) * b]) for i in range(n_blocks)]

    def peek(self, key: tuple[int, int], ids: list[int]) -> int:
        """How many tokens :meth:`lookup` would reuse (nothing counted, nothing touched)."""
        children, n = self.roots.get(key, {}), 0
        for chunk in self._chunks(ids, (len(ids) - 1) // self.block):
            node = children.get(chunk)
            if node is None:
                break
            n, children = n + self.block, node.children
        return n

    def lookup(self, key: tuple[int, int], ids: list[int]) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """(tokens reused, keys, values per layer) of the longest cached block chain that leaves at least one
        prompt token to prefill (the first sampled token needs its logits); (0, [], []) on a miss."""
        self.lookups += 1
        children, chain = self.roots.get(key, {}), []
        for chunk in self._chunks(ids, (len(ids) - 1) // self.block):
            node = children.get(chunk)
            if node is None:
                break
            chain.append(node)
            children = node.children
        if not chain:
            return 0, [], []
        self.clock += 1
        for node in chain:
            node.used = self.clock
        self.hits += 1
        n = len(chain) * self.block
        self.tokens_reused += n
        layers = range(len(chain[0].keys))
        keys = [torch.cat([c.keys[i] for c in chain], 2) for i in layers]
        values = [torch.cat([c.values[i] for c in chain], 2) for i in layers]
        return n, keys, values

    def store(self, key: tuple[int, int], ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
              start: int) -> None:  # fmt: skip
        """Cache the whole blocks of ``ids`` from one row's KV (``keys``/``values``: per layer [1, heads,
        columns, dim], the prompt's first token at column ``start``). Blocks already cached are kept as they are."""
        if self.limit == 0:
            return
        self.clock += 1
        children = self.roots.setdefault(key, {})
        for i, chunk in enumerate(self._chunks(ids, len(ids) // self.block)):
            node = children.get(chunk)
            if node is None:
                lo, hi = start + i * self.block, start + (i + 1) * self.block
                node = _Node([k[:, :, lo:hi].clone() for k in keys], [v[:, :, lo:hi].clone() for v in values])
                children[chunk] = node
                self.bytes += node.nbytes
            node.used = self.clock
            children = node.children
        self._evict()

    def drop(self, keep: set[tuple[int, int]]) -> None:
        """Forget every prefix whose (slot, load) is not in ``keep`` (unloaded or replaced adapters)."""
        for key in [k for k in self.roots if k not in keep]:
            self.bytes -= sum(n.nbytes for n in _walk(self.roots.pop(key)))

    def _evict(self) -> None:
        while self.bytes > self.limit:
            leaves = [(n.used, id(n), parent, chunk) for parent, chunk, n in self._leaves()]
            if not leaves:
                return
            _, _, parent, chunk = min(leaves, key=lambda t: (t[0], t[1]))
            self.bytes -= parent.pop(chunk).nbytes

    def _leaves(self) -> list[tuple[dict[tuple[int, ...], _Node], tuple[int, ...], _Node]]:
        out, stack = [], list(self.roots.values())
        while stack:
            children = stack.pop()
            for chunk, node in children.items():
                if node.children:
                    stack.append(node.children)
                else:
                    out.append((children, chunk, node))
        return out


def _walk(children: dict[tuple[int, ...], _Node]) -> list[_Node]:
    out, stack = [], list(children.values())
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out
