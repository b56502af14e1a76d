"""SQuAD v1.1: extractive reading comprehension, exact match / F1 (official normalisation) and their mean.

Prompt as lm-evaluation-harness's SQuAD tasks: "Title: …\\n\\nBackground: …\\n\\nQuestion: …\\n\\nAnswer:", the
model's answer is the text it generates up to the first newline (greedy by default, 32 tokens).
Splits: the paper takes 1k of train as dev and the official dev set as test, but SQuAD's train split has no
offline copy. Offline, the official dev set (48 articles) is split by article so that no passage is shared:
articles whose index in file order is 0 mod 6 → train (8 articles, 2,609 questions), 3 mod 6 → dev (8,
2,015), the other 32 → test (5,946). Online, ``--data train=rajpurkar/squad@train`` restores the paper's
train, with ``--data test=rajpurkar/squad@validation`` for the whole official dev set as test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fanlora.errors import UserError
from fanlora.metrics import squad
from fanlora.tasks.base import GenExample, GenTask, register


@register
class Squad(GenTask):
    name = "squad"
    metric = "f1"
    shown = ("exact_match", "f1_em")
    item_key = "f1"
    description = "SQuAD v1.1: extractive QA, exact match, F1 and f1-em"
    max_new_tokens = 32
    stop = ("\n",)

    def load_split(self, split: str) -> list[GenExample]:
        rows, replaced = self.rows(split, "squad/dev", "train" if split == "train" else "validation")
        titles: dict[str, int] = {}
        out = []
        for where, r in rows:
            title = self.field(r, "title", str, where)
            article = titles.setdefault(title, len(titles))
            if not replaced and {0: "train", 3: "dev"}.get(article % 6, "test") != split:
                continue
            answers = self.field(r, "answers", (list, dict), where)
            # the JSONL form is [{"text", "answer_start"}]; HF's is {"text": [...], "answer_start": [...]}
            texts = answers.get("text") if isinstance(answers, dict) else [a.get("text") for a in answers]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise UserError(f"{where}: 'answers' needs at least one answer text; fix or remove that line")
            prompt = (
                f"Title: {title}\n\nBackground: {self.field(r, 'context', str, where)}\n\n"
                f"Question: {self.field(r, 'question', str, where)}\n\nAnswer:"
            )
            out.append(GenExample(str(r.get("id", where)), prompt, " " + texts[0], list(texts), cluster=title))
        return out

    def score(self, examples: Sequence[GenExample], outputs: Sequence[Any]) -> tuple[dict[str, Any], list[dict]]:
        preds = [str(o).strip() for o in outputs]
        metrics = squad.f1_em(preds, [ex.references for ex in examples])
        records = []
        for ex, p in zip(examples, preds, strict=True):
            em, f1 = squad.best(p, ex.references)
            records.append({"id": ex.id, "prediction": p, "references": ex.references, "em": em, "f1": f1})
        return metrics, records
