"""BoolQ (SuperGLUE): answer a yes/no question about a passage.

Prompt as lm-evaluation-harness: "{passage}\\nQuestion: {question}?\\nAnswer:" with choices " no" / " yes".
Splits as the paper: the 3270-item validation set halved in file order into dev (first 1635) and test (last
1635). Train: the full split (9427) has no offline copy, so offline training uses the 32 FewGLUE examples;
online, ``--data train=super_glue:boolq@train`` trains on the full split.
"""

from __future__ import annotations

from fanlora.tasks.base import MCExample, MCTask, halve, register


@register
class BoolQ(MCTask):
    name = "boolq"
    description = "BoolQ: yes/no reading comprehension, accuracy"

    def load_split(self, split: str) -> list[MCExample]:
        rows, replaced = self.rows(split, "boolq/train_fewglue32" if split == "train" else "boolq/val")
        out = []
        for where, r in rows:
            passage = self.field(r, "passage", str, where)
            question = self.field(r, "question", str, where)
            label = self.field(r, "label", (bool, int), where)
            context = f"{passage}\nQuestion: {question}?\nAnswer:"
            title = passage.partition(" -- ")[0] if " -- " in passage else passage  # questions share passages
            out.append(MCExample(str(r.get("idx", where)), context, [" no", " yes"], int(label), cluster=title))
        return out if split == "train" or replaced else halve(out, split)
