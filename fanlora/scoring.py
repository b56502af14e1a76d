"""Stage b: the exact AB-score of every (kind, layer) — the paper's eq. 3 — with resumable progress.

    V(m,l) = S(M_all) − S(M_all without (m,l)) + S(M_null with only (m,l)) − S(M_null)

S is the negative mean loss over *all* response tokens of the validation set (a token-weighted mean, not a
mean of batch means). This engine runs 2 + 2·N_mod·L plain forward passes; the one shortcut it takes is to
apply the LM head only at positions whose loss counts, which changes no number. Each finished (kind, layer)
is appended to ``scores.partial.jsonl`` at once, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fanlora import atomic
from fanlora.data.collate import pad_batch
from fanlora.data.instruct import IGNORE, Example
from fanlora.errors import UserError
from fanlora.gates import GatedLoRA, Key

SCORES_FORMAT = "fanlora-scores/1"
PARTIAL_FORMAT = "fanlora-scores-partial/1"


def make_batches(examples: Sequence[Example], pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Length-sorted padded batches (less padding, same token set)."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [pad_batch(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def response_nll(lm: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Summed next-token NLL over response positions and their count, computing logits only there."""
    decoder = lm.get_decoder()
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    device = next(lm.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        hidden = decoder(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False)
        hidden = hidden.last_hidden_state[:, :-1]
        target = labels[:, 1:]
        where = target != IGNORE
        logits = head(hidden[where]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total += F.cross_entropy(logits, target[where], reduction="sum").item()
        count += int(where.sum())
    return total, count


def performance(gated: GatedLoRA, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """S = −(mean response-token loss) under the current gates."""
    total, count = response_nll(gated.model.get_base_model(), batches)
    return -total / count


@dataclass
class ScoreTable:
    """AB-scores of one backbone + stage-a adapter on one validation set."""

    backbone: dict[str, Any]
    kinds: list[str]
    num_layers: int
    module_names: dict[str, str]  # "Q.3" → full module name
    s_all: float
    s_null: float
    parts: dict[str, tuple[float, float]]  # "Q.3" → (S without, S only)
    method: str = "ab-exact"
    metric: str = "neg_mean_response_token_loss"
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, kind: str, layer: int) -> float:
        without, only = self.parts[f"{kind}.{layer}"]
        return self.s_all - without + only - self.s_null

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for layer in range(self.num_layers):
            for kind in self.kinds:
                key = f"{kind}.{layer}"
                without, only = self.parts[key]
                out.append(
                    {
                        "kind": kind,
                        "layer": layer,
                        "module": self.module_names[key],
                        "score": self.score(kind, layer),
                        "s_without": without,
                        "s_only": only,
                    }
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCORES_FORMAT,
            "method": self.method,
            "metric": self.metric,
            "backbone": self.backbone,
            "num_layers": self.num_layers,
            "kinds": self.kinds,
            "s_all": self.s_all,
            "s_null": self.s_null,
            **self.meta,
            "scores": self.rows(),
        }

    def write(self, json_path: str | Path, csv_path: str | Path) -> None:
        atomic.write_json(json_path, self.to_dict())
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["layer", "kind", "module", "score", "s_without", "s_only"])
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: row[k] for k in writer.fieldnames})
        atomic.write_text(csv_path, buf.getvalue())

    @classmethod
    def read(cls, path: str | Path) -> ScoreTable:
        data = atomic.read_artifact(path, SCORES_FORMAT, "scores", "fanlora score")
        parts, names = {}, {}
        for row in data["scores"]:
            key = f"{row['kind']}.{row['layer']}"
            parts[key] = (float(row["s_without"]), float(row["s_only"]))
            names[key] = row["module"]
        meta = {
            k: v
            for k, v in data.items()
            if k not in {"format", "method", "metric", "backbone", "num_layers", "kinds", "s_all", "s_null", "scores"}
        }
        return cls(
            backbone=data["backbone"],
            kinds=list(data["kinds"]),
            num_layers=int(data["num_layers"]),
            module_names=names,
            s_all=float(data["s_all"]),
            s_null=float(data["s_null"]),
            parts=parts,
            method=data.get("method", "ab-exact"),
            metric=data.get("metric", ""),
            meta=meta,
        )


def _read_partial(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Finished entries of an interrupted run; refuse a file made for another adapter, backbone or val set."""
    done: dict[str, Any] = {}
    lines = path.read_text().splitlines()
    if not lines:
        return done
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        first = None
    if first != header:
        raise UserError(
            f"{path} holds partial scores of another run (backbone, adapter or validation set differ): "
            "delete it, or score into another run directory"
        )
    for i, line in enumerate(lines[1:], 2):
        try:
            entry = json.loads(line)
            done[entry["key"]] = entry
        except (json.JSONDecodeError, KeyError, TypeError):
            if i == len(lines):  # a line cut short by a kill: recompute that entry
                break
            raise UserError(f"{path}:{i} is corrupt: delete {path} to score from scratch") from None
    return done


def ab_scores(
    gated: GatedLoRA,
    val: Sequence[Example],
    pad_id: int,
    batch_size: int,
    partial_path: str | Path,
    header: dict[str, Any],
    progress: bool = True,
) -> ScoreTable:
    """Run (or finish) the exact AB-score study; ``header`` identifies what is being scored."""
    if not val or sum(e.n_response for e in val) == 0:
        raise UserError("the validation set has no response tokens: check the data's output/response fields")
    partial_path = Path(partial_path)
    header = {"format": PARTIAL_FORMAT, **header}
    done = _read_partial(partial_path, header) if partial_path.is_file() else {}
    batches = make_batches(val, pad_id, batch_size)
    keys: list[Key] = gated.keys
    todo = [k for k in keys if f"{k[0]}.{k[1]}" not in done]
    passes = (0 if "all" in done else 1) + (0 if "null" in done else 1) + 2 * len(todo)
    lines = [json.dumps(header)] + [json.dumps(e) for e in done.values()]
    atomic.write_text(partial_path, "".join(line + "\n" for line in lines))
    bar = tqdm(total=passes, desc="AB-score passes", disable=not progress, unit="pass")
    with open(partial_path, "a", encoding="utf-8") as fh:

        def record(entry: dict[str, Any]) -> None:
            done[entry["key"]] = entry
            fh.write(json.dumps(entry) + "\n")
            fh.flush()

        for name, on in (("all", True), ("null", False)):
            if name not in done:
                gated.set_all(on)
                record({"key": name, "S": performance(gated, batches)})
                bar.update()
        for kind, layer in todo:
            with gated.without([(kind, layer)]):
                without = performance(gated, batches)
            bar.update()
            with gated.only([(kind, layer)]):
                only = performance(gated, batches)
            bar.update()
            record({"key": f"{kind}.{layer}", "without": without, "only": only})
    bar.close()
    gated.set_all(True)
    parts = {f"{k}.{n}": (done[f"{k}.{n}"]["without"], done[f"{k}.{n}"]["only"]) for k, n in keys}
    for value in [done["all"]["S"], done["null"]["S"], *(v for p in parts.values() for v in p)]:
        if not math.isfinite(value):
            raise RuntimeError("a validation pass gave a non-finite loss; the adapter or data is broken")
    return ScoreTable(
        backbone={},
        kinds=gated.layout.kinds,
        num_layers=gated.layout.num_layers,
        module_names={f"{k}.{n}": gated.layout.module_name(k, n) for k, n in keys},
        s_all=done["all"]["S"],
        s_null=done["null"]["S"],
        parts=parts,
    )
