"""COPA (SuperGLUE): choose the cause or effect of a premise.

Prompt as lm-evaluation-harness: the premise without its final period, then " because" (cause) or
" therefore" (effect); each choice follows with a lower-cased first letter, after one space (``--mc-format
lm-eval``: after two, as stock lm-eval scores it; see :class:`fanlora.tasks.base.MCTask`).
Splits as the paper (its test labels were not public): train = the 400 train items; the 100-item validation
set is halved in file order into dev (first 50) and test (last 50).
"""

from __future__ import annotations

from fanlora.errors import UserError
from fanlora.tasks.base import MCExample, MCTask, halve, register


def _choice(text: str) -> str:
    return " " + text[0].lower() + text[1:]


@register
class Copa(MCTask):
    name = "copa"
    description = "COPA: causal reasoning, 2 choices, accuracy"
    lm_eval_choice_has_space = True

    def load_split(self, split: str) -> list[MCExample]:
        rows, replaced = self.rows(split, "copa/train" if split == "train" else "copa/val")
        out = []
        for where, r in rows:
            premise = self.field(r, "premise", str, where).strip()
            question = self.field(r, "question", str, where)
            connector = {"cause": "because", "effect": "therefore"}.get(question)
            if connector is None:
                raise UserError(f"{where}: field 'question' must be 'cause' or 'effect', got {question!r}")
            choices = [_choice(self.field(r, "choice1", str, where)), _choice(self.field(r, "choice2", str, where))]
            context = (premise[:-1] if premise.endswith(".") else premise) + f" {connector}"
            out.append(MCExample(str(r.get("idx", where)), context, choices, self.field(r, "label", int, where)))
        return out if split == "train" or replaced else halve(out, split)
