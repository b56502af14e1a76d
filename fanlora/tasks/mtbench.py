"""MT-Bench: 80 two-turn questions; the model's answers are saved, then judged by an LLM (``fanlora judge``).

``fanlora evaluate --task mtbench`` only generates: turn 1 from the first question, turn 2 from the first
question, the model's first answer and the second question, each through the tokenizer's chat template;
predictions.jsonl keeps the answers (FastChat's answer layout: question_id, model_id, choices[0].turns), so
judging can be re-run or redone with another judge without regenerating. The judge is any OpenAI-compatible
endpoint (:mod:`fanlora.evaluation.judge`). MT-Bench has no training set: ``fanlora finetune --task mtbench`` trains on
the bundled instruction corpus (the paper's instruction-tuning setting), split 99:1 into train/dev; test is
the 80 questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fanlora.data.instruct import render, split_indices, to_messages
from fanlora.data.records import BUNDLED_PREFIX, read_source
from fanlora.errors import UserError
from fanlora.tasks.base import GenExample, GenTask, register

INSTRUCT_SOURCES = ("bundled:instruct/gpteacher_codegen", "bundled:instruct/gpteacher_roleplay")


def references() -> dict[int, list[str]]:
    """Reference answers (GPT-4's, as FastChat uses for math, reasoning and coding), by question id."""
    refs = {}
    for where, r in read_source(BUNDLED_PREFIX + "mt_bench/reference_answer_gpt-4"):
        try:
            refs[int(r["question_id"])] = list(r["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise UserError(f"{where}: reference answer without question_id or choices[0].turns") from None
    return refs


@register
class MtBench(GenTask):
    name = "mtbench"
    metric = "answers"
    item_key = None
    description = "MT-Bench: 80 two-turn questions, answers judged 1-10 by an LLM (fanlora judge)"
    max_new_tokens = 512
    stop = ()
    chat = True

    def load_split(self, split: str) -> list[GenExample]:
        if split != "test":
            return self._instruction_split(split)
        rows, _ = self.rows(split, "mt_bench/question")
        refs = references()
        out = []
        for where, r in rows:
            qid = self.field(r, "question_id", int, where)
            turns = self.field(r, "turns", list, where)
            if not turns or not all(isinstance(t, str) for t in turns):
                raise UserError(f"{where}: 'turns' must be a non-empty list of strings")
            meta = {"question_id": qid, "category": r.get("category", ""), "turns": turns}
            out.append(GenExample(str(qid), turns[0], "", refs.get(qid, []), meta))
        return out

    def _instruction_split(self, split: str) -> list[GenExample]:
        sources = [self.data[split]] if split in self.data else list(INSTRUCT_SOURCES)
        records = [(w, r) for s in sources for w, r in read_source(s)]
        if split in self.data:
            chosen = range(len(records))
        else:
            train, dev = split_indices(len(records), 0.01, 0)
            chosen = train if split == "train" else dev
        out = []
        for i in chosen:
            where, r = records[i]
            messages = to_messages(r, where)
            out.append(GenExample(where, messages[0]["content"], "", [], {"messages": messages}))
        return out

    def outputs(
        self,
        model: Any,
        tokenizer: Any,
        examples: Sequence[GenExample],
        decoding: Any,
        batch_size: int,
        max_length: int | None,
        progress: bool,
    ) -> list[list[str]]:
        """Both turns' answers per question; turn 2 sees the model's own turn-1 answer."""
        from fanlora.generate import generate  # torch: imported when answering, not when the CLI lists tasks

        budget = decoding.max_new_tokens or self.max_new_tokens
        answers: list[list[str]] = [[] for _ in examples]
        for turn in range(max(len(ex.meta["turns"]) for ex in examples)):
            todo = [i for i, ex in enumerate(examples) if turn < len(ex.meta["turns"])]
            prompts = []
            for i in todo:
                messages = []
                for k in range(turn + 1):
                    messages.append({"role": "user", "content": examples[i].meta["turns"][k]})
                    if k < turn:
                        messages.append({"role": "assistant", "content": answers[i][k]})
                prompts.append(render(tokenizer, messages, generation_prompt=True))
            texts = generate(
                model,
                tokenizer,
                prompts,
                decoding,
                budget,
                batch_size=batch_size,
                max_length=max_length,
                progress=progress,
                desc=f"mtbench: turn {turn + 1}",
            )
            for i, text in zip(todo, texts, strict=True):
                answers[i].append(text.strip())
        return answers

    def score(self, examples: Sequence[GenExample], outputs: Sequence[Any]) -> tuple[dict[str, Any], list[dict]]:
        records = [
            {
                "question_id": ex.meta["question_id"],
                "category": ex.meta["category"],
                "turns": ex.meta["turns"],
                "choices": [{"index": 0, "turns": list(ans)}],
            }
            for ex, ans in zip(examples, outputs, strict=True)
        ]
        return {"answers": len(records), "judged": False, "next": "fanlora judge --answers <this dir>"}, records
