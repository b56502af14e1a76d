"""BoolQ (SuperGLUE): answer a yes/no question about a passage.

Prompt as lm-evaluation-harness: "{passage}\\nQuestion: {question}?\\nAnswer:" with choices " no" / " yes".
Splits as the paper: the 3270-item validation set halved in file order into dev (first 1635) and test (last
1635). Train: the full split (9427) has no offline copy, so offline training uses the 32 FewGLUE examples.
"""

from __future__ import annotations

from fanlora.data.records import bundled_path, iter_jsonl
from fanlora.tasks.base import MCExample, MCTask, register


@register
class BoolQ(MCTask):
    name = "boolq"
    description = "BoolQ: yes/no reading comprehension, accuracy"

    def load_split(self, split: str) -> list[MCExample]:
        path = bundled_path("boolq/train_fewglue32" if split == "train" else "boolq/val")
        rows = []
        for lineno, r in iter_jsonl(path):
            where = f"{path}:{lineno}"
            passage = self.field(r, "passage", str, where)
            question = self.field(r, "question", str, where)
            label = self.field(r, "label", bool, where)
            context = f"{passage}\nQuestion: {question}?\nAnswer:"
            rows.append(MCExample(str(r.get("idx", lineno)), context, [" no", " yes"], int(label)))
        if split == "train":
            return rows
        half = len(rows) // 2
        return rows[:half] if split == "dev" else rows[half:]
