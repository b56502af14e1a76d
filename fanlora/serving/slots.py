"""Which adapter is in which slot of the engine's stacks, which slots requests hold, and which may be reused.

The bookkeeping of :class:`fanlora.serving.engine.Engine`, kept apart from its tensors: the engine writes and
shrinks the stacks; this table says where. Requests pin the slot they were admitted on, so an unload (or a
reload under the same name) never changes the weights under a request already queued or running: the name goes
at once, the slot stays *retired* until its last pin is released, then it is *freed* — cleared and reused only
on the thread that owns the model (:meth:`take_freed`), because a release may come from any thread. With
``max_loras`` the least recently pinned adapter that no request holds is the one to evict (vLLM's
``--max-loras`` LRU); when every one is held, :class:`SlotsBusy`.

Thread safety: every method takes ``book`` (never held during a forward); ``released`` is notified when a pin
is released, for a load waiting for an evictable slot.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fanlora.errors import UserError


class SlotsBusy(RuntimeError):
    """Every one of ``max_loras`` slots holds an adapter a running request uses: wait for a release, retry."""


class SlotTable:
    def __init__(self, max_loras: int | None = None) -> None:
        self.max_loras = max_loras
        self.slots: dict[str, int] = {}  # adapter name → slot (≥ 1; 0 is the bare backbone)
        self.paths: dict[str, Path] = {}
        self.rank: dict[int, int] = {}  # slot → the rank of the adapter written there
        self.pins: dict[int, int] = {}  # slot → requests holding it
        self.retired: set[int] = set()  # no name routes here (unloaded, replaced, or being written); maybe pinned
        self.freed: set[int] = set()  # free again, not yet cleared: take_freed() hands them to the model's owner
        self.loads = 0  # adapters written so far: a slot's load number tells one load from the next
        self.load_of: dict[int, int] = {}  # slot → the load number of the adapter written there
        self.used: dict[str, float] = {}  # adapter name → when a request last pinned it (LRU eviction)
        self.evictions = 0
        self.book = threading.Lock()
        self.released = threading.Condition()

    @property
    def adapters(self) -> list[str]:
        return sorted(self.slots)

    def slot_of(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.slots:
            raise UserError(f"unknown adapter {name!r}: loaded are {', '.join(self.adapters) or 'none'}")
        return self.slots[name]

    # --- requests -------------------------------------------------------------------------------------------
    def acquire(self, name: str | None) -> int:
        """The slot of ``name`` (0: none), pinned until :meth:`release`."""
        with self.book:
            slot = self.slot_of(name)
            if slot:
                self.pins[slot] = self.pins.get(slot, 0) + 1
                self.used[name] = time.monotonic()
            return slot

    def pin(self, slot: int) -> int:
        """One more pin on ``slot``, already pinned by the caller (a request's further choices)."""
        if slot:
            with self.book:
                self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if not slot:
            return
        with self.book:
            self.pins[slot] -= 1
            self._reclaim(slot)
        with self.released:
            self.released.notify_all()

    # --- loads and unloads ----------------------------------------------------------------------------------
    def victim(self, name: str) -> str | None:
        """The adapter to evict before ``name`` is loaded under ``max_loras`` (None: there is room)."""
        with self.book:
            others = [n for n in self.slots if n != name]
            if self.max_loras is None or len(others) < self.max_loras:
                return None
            idle = [n for n in others if not self.pins.get(self.slots[n])]
            if not idle:
                raise SlotsBusy(f"all {self.max_loras} adapter slots (--max-loras) are held by running requests")
            return min(idle, key=lambda n: self.used.get(n, 0.0))

    def reserve(self, capacity: int) -> int:
        """A slot below ``capacity`` no one uses, reserved while it is written (``capacity``: the stacks must
        grow by one first)."""
        with self.book:
            taken = set(self.slots.values()) | self.retired | self.freed | {s for s, n in self.pins.items() if n}
            slot = next((s for s in range(1, capacity) if s not in taken), capacity)
            self.retired.add(slot)
            return slot

    def abandon(self, slot: int) -> None:
        """A reserved slot whose write failed: free again."""
        with self.book:
            self._reclaim(slot)

    def commit(self, name: str, slot: int, rank: int, path: Path) -> None:
        """``name`` now routes to the written ``slot``; the slot it had is retired."""
        with self.book:
            self.retired.discard(slot)
            self.rank[slot] = rank
            self.loads += 1
            self.load_of[slot] = self.loads
            old = self.slots.get(name)
            self.slots[name], self.paths[name] = slot, path
            self.used[name] = time.monotonic()  # just loaded: not the first to go before its request pins it
            if old is not None:
                self.retired.add(old)
                self._reclaim(old)

    def forget(self, name: str) -> None:
        """Unload ``name``: it routes nowhere; its slot is freed once no request holds it."""
        with self.book:
            slot = self.slots.pop(name, None)
            if slot is None:
                raise UserError(f"no adapter {name!r} is loaded: loaded are {', '.join(self.adapters) or 'none'}")
            self.paths.pop(name)
            self.used.pop(name, None)
            self.retired.add(slot)
            self._reclaim(slot)

    def take_freed(self) -> tuple[int, set[int]] | None:
        """On the model's owner: clear the freed slots; then (the widest rank still held, the slots still held),
        or None when nothing was freed."""
        with self.book:
            if not self.freed:
                return None
            for slot in self.freed:
                self.rank.pop(slot, None)
            self.freed.clear()
            held = set(self.slots.values()) | self.retired | {s for s, n in self.pins.items() if n}
            return max([self.rank.get(s, 1) for s in held] + [1]), held

    def _reclaim(self, slot: int) -> None:
        if slot in self.retired and not self.pins.get(slot):
            self.retired.discard(slot)
            self.pins.pop(slot, None)
            self.freed.add(slot)

    # --- what KV belongs to ---------------------------------------------------------------------------------
    def key(self, slot: int) -> tuple[int, int]:
        """(slot, load number): what KV computed on this slot belongs to (slot 0, the bare backbone: (0, 0))."""
        return slot, self.load_of.get(slot, 0)

    def live_keys(self) -> set[tuple[int, int]]:
        """The slot keys a request can still route to or is pinned on."""
        with self.book:
            held = set(self.slots.values()) | {s for s, n in self.pins.items() if n}
            return {(0, 0)} | {self.key(s) for s in held}
