"""The Shapley value of each module in the cooperative game v(S) = S(model with only S's gates on).

The AB-score keeps two of the Shapley value's marginal contributions (joining everyone, joining no one);
the paper compares it against the full Shapley value. Exact enumeration needs v on all 2^n subsets, so it
serves small games (tests check the estimator against it); real backbones use permutation sampling:
walk a random order of the modules, switching gates on one by one, and credit each module with the change.
Switching on (m, l) leaves layers before l untouched, so each step re-runs layers l..L−1 from the hidden
states cached for the previous step — about half the work of full passes. Each permutation (per chunk of
the validation set) is one unit of work: recorded when done, split over processes by index.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

import torch

from fanlora.backbone import module_key
from fanlora.errors import UserError
from fanlora.gates import GatedLoRA, Key
from fanlora.scoring import memory
from fanlora.scoring.exact import tile_ranges
from fanlora.scoring.journal import Journal
from fanlora.scoring.replay import Batch, Replayer
from fanlora.scoring.rowgates import RowGates


def permutation(players: Sequence[Key], seed: int, index: int) -> list[Key]:
    """The ``index``-th sampled order: fixed by (seed, index), so shards and resumed runs agree."""
    order = list(players)
    random.Random(seed * 1_000_003 + index).shuffle(order)
    return order


def entry_id(chunk: tuple[int, int], index: int) -> str:
    return f"{chunk[0]}-{chunk[1]}:p{index}"


@torch.no_grad()
def run(
    gated: GatedLoRA,
    batches: Sequence[Batch],
    progress: Journal,
    mine: Sequence[int],
    seed: int,
    memory_limit: int,
    players: Sequence[Key] | None = None,
    tick: Callable[[int], None] = lambda n: None,
) -> None:
    """Sample permutations ``mine`` and record the summed NLL after each step (step 0: no gate on)."""
    lm = gated.model.get_base_model()
    replayer = Replayer(lm, gated.layout.layers_path)
    gates = RowGates(gated)
    players = list(players or gated.keys)
    elem = next(lm.parameters()).element_size()
    # one cache (not two, as the AB engine keeps) → the same plan has room to spare
    chunks = memory.plan_chunks(lm.config, batches, memory_limit, elem)
    with gates.active():
        for chunk in chunks:
            part = batches[chunk[0] : chunk[1]]
            for index in mine:
                if entry_id(chunk, index) in progress.done:
                    continue
                gates.set_all(None)
                caches, total = [], 0.0
                for b in part:
                    nll, captured = replayer.forward(b, capture=True)
                    caches.append(captured)
                    total += float(nll.sum())
                curve = [total]
                for kind, layer in permutation(players, seed, index):
                    gates.gates[(kind, layer)] = True
                    total = 0.0
                    for bi, b in enumerate(part):
                        nll, captured = replayer.forward(b, start=layer, hidden=caches[bi][layer], capture=True)
                        caches[bi][layer:] = captured
                        total += float(nll.sum())
                    curve.append(total)
                progress.record({"id": entry_id(chunk, index), "nll": curve})
                tick(1)


def assemble(
    entries: dict[str, dict[str, Any]],
    players: Sequence[Key],
    budget: int,
    seed: int,
    n_batches: int,
    n_tokens: int,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean marginal contribution over the ``budget`` permutations, with its standard error."""
    by_perm: dict[int, dict[tuple[int, int], list[float]]] = {}
    for eid, entry in entries.items():
        span, p = eid.split(":", 1)
        a, b = span.split("-")
        by_perm.setdefault(int(p[1:]), {})[(int(a), int(b))] = entry["nll"]
    missing = [p for p in range(budget) if tile_ranges(list(by_perm.get(p, {})), n_batches) is None]
    if missing:
        raise UserError(
            f"the scores are incomplete: permutation(s) {', '.join(map(str, missing[:4]))} missing — give every "
            "shard (or re-run `fanlora score` to finish)"
        )
    samples: dict[str, list[float]] = {module_key(k, n): [] for k, n in players}
    for p in range(budget):
        curves = [by_perm[p][t] for t in tile_ranges(list(by_perm[p]), n_batches)]
        v = [-sum(c[j] for c in curves) / n_tokens for j in range(len(players) + 1)]
        for j, (kind, layer) in enumerate(permutation(players, seed, p)):
            samples[module_key(kind, layer)].append(v[j + 1] - v[j])
    values, columns = {}, {}
    for key, xs in samples.items():
        mean = sum(xs) / len(xs)
        var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else float("nan")
        values[key] = mean
        columns[key] = {"std_error": math.sqrt(var / len(xs)) if len(xs) > 1 else float("nan")}
    return values, columns


@torch.no_grad()
def exact_values(gated: GatedLoRA, batches: Sequence[Batch], players: Sequence[Key]) -> dict[str, float]:
    """Exact Shapley values by enumerating all 2^n coalitions (n ≤ ~10; one full pass per coalition)."""
    players = list(players)
    n = len(players)
    if n > 12:
        raise UserError(f"exact Shapley values over {n} modules need 2^{n} passes: sample permutations instead")
    lm = gated.model.get_base_model()
    replayer = Replayer(lm, gated.layout.layers_path)
    gates = RowGates(gated)
    n_tokens = sum(b.n_scored for b in batches)
    value: dict[frozenset, float] = {}
    with gates.active():
        for size in range(n + 1):
            for coalition in combinations(players, size):
                gates.set_all(None)
                for key in coalition:
                    gates.gates[key] = True
                total = sum(float(replayer.forward(b)[0].sum()) for b in batches)
                value[frozenset(coalition)] = -total / n_tokens
    phi = {}
    for kind, layer in players:
        m = (kind, layer)
        acc = 0.0
        for coalition, v in value.items():
            if m in coalition:
                continue
            s = len(coalition)
            weight = math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
            acc += weight * (value[coalition | {m}] - v)
        phi[module_key(kind, layer)] = acc
    return phi
