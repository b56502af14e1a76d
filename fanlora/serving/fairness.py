"""Who gets the next iteration's tokens and rows: max-min fair across tenants, then across their prompts.

A tenant is an adapter (its slot; the bare backbone is one tenant too). Each iteration has a token budget
(``--max-batched-tokens``, vLLM's name): every decoding row's next token first, then prompt tokens of the rows
still prefilling. Spent first come, first served, one tenant's burst of long prompts held every other tenant's
first token for minutes (a 4-token request waited 38 s behind 8 × 1,000-token prompts). Here the prefill budget
is *water-filled*: split equally among tenants with prompt tokens left, a tenant needing less than its share
gives the rest back to the others, and each tenant's share is split the same way among its prompts — so a short
prompt completes in the iteration it joins, and a tenant's burst slows only itself.

Rows are handed out the same way: a waiting job whose tenant holds the fewest rows joins first (ties: arrival
order), and when every row is taken a prompt that has not started decoding may be *preempted* — its KV dropped,
recomputed later, as vLLM does — to give a tenant holding no row one.

vLLM's scheduler (``--max-num-batched-tokens``, chunked prefill) is first come, first served per request and has
no notion of tenants; nothing in transformers schedules tenants. So this is ours, and small: pure functions the
continuous scheduler calls each iteration.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


def water_fill(demands: Sequence[int], budget: int) -> list[int]:
    """Max-min fair integer shares of ``budget`` for ``demands``: nobody gets more than it asks, and any share
    below the others' is the whole of its demand. Left-over single tokens go to the earliest demands."""
    give = [0] * len(demands)
    left = max(0, budget)
    active = [i for i, d in enumerate(demands) if d > 0]
    while left > 0 and active:
        share = max(1, left // len(active))
        for i in list(active):
            g = min(share, demands[i] - give[i], left)
            give[i] += g
            left -= g
            if give[i] == demands[i]:
                active.remove(i)
            if left == 0:
                break
    return give


def fair_shares(items: Sequence[T], tenant: dict[T, Hashable], need: dict[T, int], budget: int) -> dict[T, int]:
    """Tokens for each of ``items`` (in arrival order): water-filled across tenants, then within each tenant."""
    tenants: dict[Hashable, list[T]] = {}
    for item in items:
        tenants.setdefault(tenant[item], []).append(item)
    groups = list(tenants.values())
    per_tenant = water_fill([sum(need[i] for i in group) for group in groups], budget)
    out: dict[T, int] = {}
    for group, share in zip(groups, per_tenant, strict=True):
        out.update(zip(group, water_fill([need[i] for i in group], share), strict=True))
    return out


def next_to_join(tenants: Sequence[Hashable], rows_held: dict[Hashable, int]) -> int:
    """Index of the waiting job (``tenants``: theirs, in arrival order) to give a row next: its tenant holds the
    fewest rows, first come on ties."""
    return min(range(len(tenants)), key=lambda i: (rows_held.get(tenants[i], 0), i))


def victim(
    prefilling: Sequence[T], tenant: dict[T, Hashable], rows_held: dict[Hashable, int], for_tenant: Hashable
) -> T | None:
    """A not-yet-decoding row to preempt so that ``for_tenant`` (holding no row) gets one: the latest-arrived
    prompt of the tenant holding the most rows, if that tenant holds more than one; else None."""
    if rows_held.get(for_tenant, 0) > 0:
        return None
    candidates = [r for r in prefilling if rows_held.get(tenant[r], 0) > 1]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (rows_held[tenant[r]], prefilling.index(r)))
