"""One backbone, many FanLoRA adapters held unmerged, every batch row with its own adapter.

Why not PEFT: PEFT's unmerged forward costs nearly the same with LoRA on 2 modules per layer as on all 7, and
its mixed-adapter batches (``adapter_names=``) loop over adapters in Python. Every tenant's adapter here shares
the backbone's one setting, so the engine:

- wraps only the setting's modules (2 per layer for K_max = 2); every other linear runs untouched;
- keeps, per wrapped module, the adapters' factors stacked — ``A`` as [slots, in, R] and ``s·B`` as
  [slots, R, out] (pre-transposed), slot 0 all zeros for "no adapter", ranks zero-padded to the largest R
  (exact: the padding adds zeros);
- applies a batch as :mod:`fanlora.serving.multilora` says: one adapter → two plain matmuls; mixed rows →
  each long run of one adapter's tokens its own update, short runs one stacked product masked per token;
- leaves decoding, the KV cache and beam search to ``transformers``' ``generate`` (rows are repeated for the
  beams the way HF expands them).

Adapters are loaded and unloaded at run time. Isolation between tenants is an invariant here: an adapter is
checked completely (:func:`fanlora.serving.adapters.read_adapter`: finite values, shapes, ranks up to
``max_rank``) and against the engine's setting before it touches a stack; it is written into a fresh slot that
replaces the old one only when complete; a mixed batch never lets one tenant's factors reach another's rows
(see :mod:`fanlora.serving.multilora`); and the stacks shrink back when the adapter with the largest rank leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fanlora.errors import UserError
from fanlora.generate import generate
from fanlora.serving.adapters import DEFAULT_MAX_RANK, LoadedAdapter, read_adapter
from fanlora.serving.multilora import MultiLoRALinear, Rows
from fanlora.serving.slots import SlotTable
from fanlora.setting import Setting


class Engine:
    """The backbone model with the setting's modules wrapped; adapters by name."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        setting: Setting,
        identity: dict[str, Any],
        max_rank: int = DEFAULT_MAX_RANK,
        max_loras: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.setting, self.identity = model.eval(), tokenizer, setting, identity
        self.max_rank, self.max_loras = max_rank, max_loras
        self.rows = Rows()
        self.modules: dict[str, MultiLoRALinear] = {}
        for name in setting.modules:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            if not isinstance(base, nn.Linear | Conv1D):
                raise UserError(f"setting module {name} is a {type(base).__name__}, not a linear layer")
            wrapped = MultiLoRALinear(base, self.rows)
            setattr(parent, child, wrapped)
            self.modules[name] = wrapped
        self.rank = 1  # the stacks' rank: the widest adapter's
        self.table = SlotTable(max_loras)  # which adapter is in which slot, and which slots requests hold
        if max_loras is not None and self.modules:  # every slot made once: a load writes one slot in place
            for wrapped in self.modules.values():
                wrapped.A = wrapped.A.new_zeros(max_loras + 2, wrapped.A.shape[1], wrapped.A.shape[2])
                wrapped.B = wrapped.B.new_zeros(max_loras + 2, wrapped.B.shape[1], wrapped.B.shape[2])
                wrapped.refresh()  # max_loras resident + the bare backbone's slot 0 + one for a reload

    @classmethod
    def from_backbone(
        cls, backbone: Any, setting: Setting, max_rank: int = DEFAULT_MAX_RANK, max_loras: int | None = None
    ) -> Engine:
        setting.validate(backbone)
        return cls(backbone.model, backbone.tokenizer, setting, backbone.identity, max_rank, max_loras)

    # --- adapters -------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return self.table.adapters

    def check(self, adapter: LoadedAdapter) -> None:
        """Refuse an adapter made for another setting or backbone, with the reason."""
        ours = set(self.setting.modules)
        extra = sorted(set(adapter.factors) - ours)
        if extra:
            raise UserError(
                f"adapter {adapter.path} has LoRA on {extra[0]} (and {len(extra) - 1} more) outside this engine's "
                "setting: fine-tune it on the backbone's setting (fanlora finetune --setting …)"
            )
        if adapter.setting is not None:
            backbone = adapter.setting.get("backbone")
            digest = backbone.get("weights_digest") if isinstance(backbone, dict) else None
            if digest != self.identity.get("weights_digest"):
                raise UserError(f"adapter {adapter.path} was made for another backbone (weights digest differs)")
            modules = adapter.setting.get("modules")
            if not isinstance(modules, list) or sorted(map(str, modules)) != sorted(ours):
                raise UserError(
                    f"adapter {adapter.path} belongs to another setting (its setting.json lists other modules)"
                )
        for name, (a, b) in adapter.factors.items():
            base = self.modules[name]
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise UserError(
                    f"adapter {adapter.path}: {name} has shape {tuple(b.shape)}x{tuple(a.shape)}, "
                    f"the backbone's is {base.out_features}x{base.in_features}"
                )

    def load(self, name: str, path: str | Path) -> None:
        """Load (or replace) adapter ``name`` from a PEFT directory.

        The adapter is read and checked whole first; it is then written into a free slot (never the slot the
        name serves now), and only when every module is written does the name move to it — a refused or
        failed reload leaves the adapter being served as it was. Not concurrent with a forward pass (growing
        the stacks swaps tensors): the server runs it on the engine's thread between two steps
        (``Admission.on_engine``).
        """
        self.install(name, read_adapter(path, self.max_rank))

    def install(self, name: str, adapter: LoadedAdapter) -> None:
        """:meth:`load` of an adapter already read (the server's host cache keeps parsed adapters). With
        ``max_loras`` adapters resident, the least recently used one that no request holds is evicted first;
        :class:`SlotsBusy` when every one is held."""
        self.check(adapter)
        victim = self.table.victim(name)
        if victim is not None:
            self.unload(victim)
            self.table.evictions += 1
        self.compact()
        capacity = next(iter(self.modules.values())).A.shape[0] if self.modules else 1
        slot = self.table.reserve(capacity)  # no other load takes it while it is written
        try:
            if slot == capacity:  # one more slot on every stack
                for wrapped in self.modules.values():
                    wrapped.A = torch.cat([wrapped.A, torch.zeros_like(wrapped.A[:1])])
                    wrapped.B = torch.cat([wrapped.B, torch.zeros_like(wrapped.B[:1])])
                    wrapped.refresh()
            if adapter.rank > self.rank:
                self._grow_rank(adapter.rank)
            for module_name, wrapped in self.modules.items():
                wrapped.A[slot].zero_()
                wrapped.B[slot].zero_()
                if module_name in adapter.factors:
                    a, b = adapter.factors[module_name]
                    r = a.shape[0]
                    wrapped.A[slot, :, :r] = a.T.to(wrapped.A.dtype)
                    wrapped.B[slot, :r] = b.T.to(wrapped.B.dtype)
                wrapped.refresh(slot)
        except BaseException:
            self.table.abandon(slot)
            raise
        self.table.commit(name, slot, adapter.rank, Path(adapter.path))

    def unload(self, name: str) -> None:
        """Forget ``name``; requests already admitted on it finish on its weights (their slot is pinned)."""
        self.table.forget(name)
        self.compact()

    def compact(self) -> None:
        """Make the freed slots free for loads, and when the widest adapter has left, drop the rank columns (and
        trailing slots) nothing live, pinned or reserved uses. Called before a forward and by loads, on the
        thread that owns the model. A freed slot is not zeroed: no row routes to it, and a load zeroes a slot
        before writing it. The stacks are reallocated only when the rank shrinks, so reload churn does not
        fragment memory."""
        taken = self.table.take_freed()
        if taken is None:
            return
        rank, held = taken
        if not self.modules or rank >= self.rank:
            return
        slots = max(max(held | {0}) + 1, (self.max_loras or 0) + 2)  # preallocated slots stay
        for wrapped in self.modules.values():
            wrapped.A = wrapped.A[:slots, :, :rank].contiguous()
            wrapped.B = wrapped.B[:slots, :rank].contiguous()
            wrapped.refresh()
        self.rank = rank

    def _grow_rank(self, rank: int) -> None:
        for wrapped in self.modules.values():
            pad = rank - wrapped.A.shape[2]
            wrapped.A = torch.cat([wrapped.A, wrapped.A.new_zeros(wrapped.A.shape[0], wrapped.A.shape[1], pad)], 2)
            wrapped.B = torch.cat([wrapped.B, wrapped.B.new_zeros(wrapped.B.shape[0], pad, wrapped.B.shape[2])], 1)
            wrapped.refresh()
        self.rank = rank

    # --- running --------------------------------------------------------------------------------------------
    def use(self, names: Sequence[str | None]) -> None:
        """Route the next forward passes: row i uses adapter ``names[i]`` (None: the bare backbone)."""
        self.use_slots([self.table.slot_of(n) for n in names])

    def use_slots(self, slots: Sequence[int]) -> None:
        """Route the next forward passes by slot (what the scheduler pinned at admission): the runs of rows on
        one adapter and one mask per batch, shared by every wrapped module (each module takes the runs when
        they are long — prefill — and the stacked update when they are short: at decode shapes one small
        product per adapter costs more than one product over every adapter). Runs in the thread that owns
        the model, so it also compacts."""
        self.compact()
        first = next(iter(self.modules.values()), None)
        stacked, device = (None, None) if first is None else (first.A.shape[0], first.A.device)
        self.rows.route(slots, self.rank, stacked, device)

    @torch.no_grad()
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, names: Sequence[str | None]
    ) -> torch.Tensor:
        self.use(names)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        names: Sequence[str | None],
        decoding: Any,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[str]:
        """Each prompt continued with its own adapter, batched together (fanlora.generate does the batching)."""
        if len(prompts) != len(names):
            raise ValueError(f"{len(prompts)} prompts for {len(names)} adapter names")
        for n in names:
            self.table.slot_of(n)

        def route(batch: list[int]) -> None:
            self.use([names[i] for i in batch])

        return generate(
            self.model,
            self.tokenizer,
            prompts,
            decoding,
            max_new_tokens,
            stop=stop,
            batch_size=batch_size,
            progress=progress,
            on_batch=route,
        )
