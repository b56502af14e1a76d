"""GSM8K: grade-school math word problems, accuracy of the final number (stand-in for the paper's math set).

Prompt: "Question: {question}\\nAnswer:"; stage d trains on the reference solution, which ends with
"#### <number>". The prediction is the number after the last "####" the model writes, else the last number
in its text (:mod:`fanlora.metrics.gsm8k`); it is right when it equals the gold number exactly.
Splits: the official 7,473 train problems minus their last 500, which are dev; the official 1,319 test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fanlora.errors import UserError
from fanlora.metrics import gsm8k
from fanlora.tasks.base import GenExample, GenTask, register

DEV_SIZE = 500


@register
class Gsm8k(GenTask):
    name = "gsm8k"
    description = "GSM8K: math word problems, final-number accuracy"
    max_new_tokens = 256
    stop = ("\nQuestion:", "\n\n\n")

    def load_split(self, split: str) -> list[GenExample]:
        rows, replaced = self.rows(split, "gsm8k/test" if split == "test" else "gsm8k/train")
        out = []
        for where, r in rows:
            question = self.field(r, "question", str, where).strip()
            answer = self.field(r, "answer", str, where).strip()
            if gsm8k.extract(answer) is None:
                raise UserError(f"{where}: 'answer' has no final number (expected '#### <number>')")
            out.append(
                GenExample(f"gsm8k-{split}-{len(out)}", f"Question: {question}\nAnswer:", " " + answer, [answer])
            )
        if split == "test" or replaced:
            return out
        return out[:-DEV_SIZE] if split == "train" else out[-DEV_SIZE:]

    def score(self, examples: Sequence[GenExample], outputs: Sequence[Any]) -> tuple[dict[str, Any], list[dict]]:
        records = []
        for ex, text in zip(examples, outputs, strict=True):
            got, want = gsm8k.extract(str(text)), gsm8k.extract(ex.references[0])
            records.append(
                {
                    "id": ex.id,
                    "output": text,
                    "prediction": None if got is None else str(got),
                    "gold": str(want),
                    "correct": gsm8k.correct(str(text), ex.references[0]),
                }
            )
        n = max(1, len(records))
        metrics = {
            "acc": sum(r["correct"] for r in records) / n,
            "no_number": sum(r["prediction"] is None for r in records),
        }
        return metrics, records
