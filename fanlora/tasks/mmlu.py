"""MMLU (57 subjects, 4 choices): zero-shot accuracy per subject and macro-averaged over subjects.

Prompt as lm-evaluation-harness's default ``mmlu`` task: "The following are multiple choice questions
(with answers) about <subject>.", the question, the choices as "A. …" to "D. …", then "Answer:"; the
choices scored are " A" … " D". Splits (MMLU has no labelled split besides its tiny dev and large test):
train = the 285 dev items (5 per subject, the usual few-shot exemplars); the 14,042 test items, in file
order (grouped by subject), go to dev when their index is a multiple of 10 (1,405) and to test otherwise
(12,637), so both halves cover every subject.
"""

from __future__ import annotations

from fanlora.errors import UserError
from fanlora.tasks.base import MCExample, MCTask, register

LETTERS = "ABCD"


@register
class Mmlu(MCTask):
    name = "mmlu"
    shown = ("acc_norm", "acc_macro")
    description = "MMLU: 57 subjects, 4 choices, accuracy per subject and macro"

    def load_split(self, split: str) -> list[MCExample]:
        rows, replaced = self.rows(split, "mmlu/dev" if split == "train" else "mmlu/test")
        out = []
        for i, (where, r) in enumerate(rows):
            if split != "train" and not replaced and (i % 10 == 0) != (split == "dev"):
                continue
            subject = self.field(r, "subject", str, where)
            choices = self.field(r, "choices", list, where)
            answer = self.field(r, "answer", int, where)
            if len(choices) != 4 or not 0 <= answer < 4:
                raise UserError(f"{where}: MMLU needs 4 choices and an answer 0-3")
            lines = [f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices)]
            context = (
                f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
                f"{self.field(r, 'question', str, where).strip()}\n" + "\n".join(lines) + "\nAnswer:"
            )
            out.append(MCExample(f"{subject}-{i + 1}", context, [f" {x}" for x in LETTERS], answer, subject))
        return out
