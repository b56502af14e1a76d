"""The exact AB-score (the paper's eq. 3) with prefix caching and batched ablations.

    V(m,l) = S(M_all) − S(M_all without (m,l)) + S(M_null with only (m,l)) − S(M_null)

A naive study runs 2 + 2·N·L full forward passes. Here one pass each of M_all and M_null caches the hidden
state entering every layer; the 2·N ablations of layer l start from those caches and run layers l..L−1
only, the N kinds × {without, only} side by side as replicas of one batch with per-row gates (as many as the
memory limit, and on a CPU a token budget, allow) — (L+1)/(2L) of the naive decoder work — and the LM head
runs only where the loss counts. S is a token-weighted
mean over the whole validation set, so each unit of work records summed NLLs, which add across chunks and
processes exactly; :func:`assemble` turns them into scores once every unit is in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fanlora.backbone import module_key
from fanlora.errors import UserError
from fanlora.gates import GatedLoRA
from fanlora.scoring import memory
from fanlora.scoring.journal import Journal
from fanlora.scoring.replay import Batch, Replayer
from fanlora.scoring.rowgates import RowGates, row_gate


def assign_layers(num_layers: int, world: int) -> list[list[int]]:
    """Split layers over ``world`` workers, balancing the cost of layer l's ablations (∝ L − l), greedily
    largest first; deterministic, so every process and every manual shard computes the same split."""
    loads = [0] * world
    parts: list[list[int]] = [[] for _ in range(world)]
    for layer in range(num_layers):  # layer 0 is the most expensive
        w = min(range(world), key=lambda i: (loads[i], i))
        parts[w].append(layer)
        loads[w] += num_layers - layer
    return parts


def entry_id(chunk: tuple[int, int], key: str) -> str:
    return f"{chunk[0]}-{chunk[1]}:{key}"


@torch.no_grad()
def run(
    gated: GatedLoRA,
    batches: Sequence[Batch],
    progress: Journal,
    layers: Sequence[int],
    memory_limit: int,
    tick: Callable[[int], None] = lambda n: None,
) -> None:
    """Compute every unfinished (chunk, key) entry of ``layers`` (plus M_all/M_null), recording each."""
    lm = gated.model.get_base_model()
    layout = gated.layout
    replayer = Replayer(lm, layout.layers_path)
    gates = RowGates(gated)
    elem = next(lm.parameters()).element_size()
    device = batches[0].input_ids.device
    dtype = next(lm.parameters()).dtype
    chunks = memory.plan_chunks(lm.config, batches, memory_limit, elem)
    g_max = memory.group_size(lm.config, batches, len(layout.kinds), memory_limit, elem, device.type == "cpu")
    with gates.active():
        for chunk in chunks:
            part = batches[chunk[0] : chunk[1]]
            todo = {
                layer: [k for k in layout.kinds if entry_id(chunk, module_key(k, layer)) not in progress.done]
                for layer in layers
            }
            todo = {layer: kinds for layer, kinds in todo.items() if kinds}
            base_done = all(entry_id(chunk, s) in progress.done for s in ("all", "null"))
            if not todo and base_done:
                continue
            caches: dict[str, list[list[torch.Tensor]]] = {"all": [], "null": []}
            for name, value in (("all", True), ("null", None)):
                gates.set_all(value)
                total = 0.0
                for b in part:
                    nll, captured = replayer.forward(b, capture=True)
                    caches[name].append(captured)
                    total += float(nll.sum())
                if entry_id(chunk, name) not in progress.done:
                    progress.record({"id": entry_id(chunk, name), "nll": total})
                tick(1)
            for layer, kinds in todo.items():
                for i in range(0, len(kinds), g_max):
                    group = kinds[i : i + g_max]
                    sums = _ablate(gates, replayer, part, caches, layer, group, device, dtype)
                    for j, kind in enumerate(group):
                        progress.record(
                            {
                                "id": entry_id(chunk, module_key(kind, layer)),
                                "without": sums[j],
                                "only": sums[len(group) + j],
                            }
                        )
                    tick(2 * len(group))
            del caches


def _ablate(
    gates: RowGates,
    replayer: Replayer,
    part: Sequence[Batch],
    caches: dict[str, list[list[torch.Tensor]]],
    layer: int,
    group: list[str],
    device: torch.device,
    dtype: torch.dtype,
) -> list[float]:
    """Summed NLL of [M_all without (k, layer) for k in group] + [M_null with only (k, layer) for k in group]."""
    g = len(group)
    sums = torch.zeros(2 * g, dtype=torch.float64)
    for bi, b in enumerate(part):
        for kind, lay in gates.gates:
            if lay < layer:
                gates.gates[(kind, lay)] = None  # never runs: layers before `layer` are replayed from the cache
            elif lay > layer:
                gates.gates[(kind, lay)] = row_gate([1.0] * g + [0.0] * g, b.rows, device, dtype)
            else:
                without = [0.0 if kind == k else 1.0 for k in group]
                only = [1.0 if kind == k else 0.0 for k in group]
                gates.gates[(kind, lay)] = row_gate(without + only, b.rows, device, dtype)
        hidden = torch.cat([caches["all"][bi][layer]] * g + [caches["null"][bi][layer]] * g)
        nll, _ = replayer.forward(b, replicas=2 * g, start=layer, hidden=hidden)
        sums += nll.double().cpu()
    return sums.tolist()


def tile_ranges(ranges: list[tuple[int, int]], n: int) -> list[tuple[int, int]] | None:
    """A set of ranges that exactly covers [0, n), or None: entries from differently chunked runs mix."""
    starts: dict[int, tuple[int, int]] = {}
    for r in sorted(set(ranges), key=lambda r: r[1] - r[0]):
        starts[r[0]] = r  # the longest range from each start wins
    out, pos = [], 0
    while pos < n:
        if pos not in starts:
            return None
        out.append(starts[pos])
        pos = starts[pos][1]
    return out if pos == n else None


def assemble(
    entries: dict[str, dict[str, Any]], keys: list[str], n_batches: int, n_tokens: int
) -> tuple[dict[str, float], dict[str, dict[str, float]], float, float]:
    """Scores from recorded entries: (values, columns, S_all, S_null). Refuses an incomplete set."""
    by_key: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for eid, entry in entries.items():
        span, key = eid.split(":", 1)
        a, b = span.split("-")
        by_key.setdefault(key, {})[(int(a), int(b))] = entry
    missing = []
    sums: dict[str, dict[str, float]] = {}
    for key in ["all", "null", *keys]:
        tiles = tile_ranges(list(by_key.get(key, {})), n_batches)
        if tiles is None:
            missing.append(key)
            continue
        parts = [by_key[key][t] for t in tiles]
        fields = ["nll"] if key in ("all", "null") else ["without", "only"]
        sums[key] = {f: sum(p[f] for p in parts) for f in fields}
    if missing:
        raise UserError(
            f"the scores are incomplete: no result for {', '.join(missing[:4])}"
            f"{' …' if len(missing) > 4 else ''} — give every shard (or re-run `fanlora score` to finish)"
        )
    s_all = -sums["all"]["nll"] / n_tokens
    s_null = -sums["null"]["nll"] / n_tokens
    values, columns = {}, {}
    for key in keys:
        without = -sums[key]["without"] / n_tokens
        only = -sums[key]["only"] / n_tokens
        values[key] = s_all - without + only - s_null
        columns[key] = {"s_without": without, "s_only": only}
    return values, columns, s_all, s_null
