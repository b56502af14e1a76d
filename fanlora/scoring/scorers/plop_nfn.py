"""``plop-nfn``: PLoP (Hayou, Ghosh & Yu, "PLoP: Precise LoRA Placement", ICLR 2026) — module *types* whose
normalised feature norm (NFN) on the task's data is lowest carry LoRA: a low NFN says the pretrained weight is
not yet aligned with these inputs, so adapting it should pay most. Forward passes of the bare backbone only,
one per validation batch; no stage a (engine: :mod:`fanlora.scoring.probes`).

Reconstructed from the paper's description (no code of theirs was run): NFN(W, x) = ||W x|| / ||W z̃|| with z̃
a Gaussian vector of x's norm, taken here in closed form (see ``probes``), averaged over every non-padding token
of the instruction validation set; a type's NFN is the mean over layers. The table's value of (kind, layer) is
1 / NFN(kind) — positive, the same in every layer — so ``fanlora select --k-max 2`` keeps PLoP's two types in
every layer; each layer's own NFN is in the ``nfn`` column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fanlora.backbone import module_key
from fanlora.scoring.scorers.registry import Assembled, Scorer, Study, register

if TYPE_CHECKING:  # annotations only (torch)
    from fanlora.gates import GatedLoRA
    from fanlora.scoring.journal import Journal


class PlopNFN(Scorer):
    name = "plop-nfn"
    summary = "PLoP's feature-norm score per module type, bare backbone, 1 forward per batch"
    needs_stage_a = False

    def cost(self, study: Study) -> int:
        return study.n_batches

    def compute(self, study: Study, gated: GatedLoRA, batches: Sequence[Any], progress: Journal,
                units: Sequence[int], memory_limit: int, tick: Callable[[int], None]) -> None:  # fmt: skip
        from fanlora.scoring import probes

        probes.run_nfn(gated.model, gated.layout, batches, progress, units, tick)

    def assemble(self, study: Study, entries: dict[str, dict[str, Any]]) -> Assembled:
        from fanlora.scoring import probes

        nfn = probes.mean_per_token(entries, study.keys, study.n_batches)
        by_kind = {
            k: sum(nfn[module_key(k, n)] for n in range(study.num_layers)) / study.num_layers for k in study.kinds
        }
        values = {key: 1.0 / by_kind[key.split(".")[0]] for key in study.keys}
        columns = {key: {"nfn": nfn[key], "nfn_kind": by_kind[key.split(".")[0]]} for key in study.keys}
        return values, columns, None, None


register(PlopNFN())
