"""Text-to-SQL over a generated insurance database, scored by execution (stand-in for the paper's Q2SQL).

The database and ≥ 3,000 question → SQL pairs are generated from a fixed seed (:mod:`fanlora.sqlgen`) on
first use. Prompt: the schema (one line per table), the question, then "SQL:"; the model writes one line of
SQL. A prediction is right iff it executes and returns the gold's rows (as a multiset; in order when the gold
has ORDER BY) — :mod:`fanlora.metrics.sql`, on a read-only connection, with a time limit per query; errors and
time-outs count as wrong and never stop the evaluation. Splits by a hash of the gold SQL: train 3,207,
dev 391, test 402. ``--data SPLIT=FILE`` takes JSONL rows with ``question`` and ``query`` on the same database.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fanlora.data.records import iter_jsonl
from fanlora.errors import UserError
from fanlora.metrics import sql as sqlmetric
from fanlora.sqlgen import PROMPT_SCHEMA, dataset_dir
from fanlora.tasks.base import GenExample, GenTask, register

TIMEOUT_S = 5.0


@register
class Sql(GenTask):
    name = "sql"
    metric = "execution_accuracy"
    item_key = "correct"
    description = "insurance text-to-SQL (generated SQLite), execution accuracy"
    max_new_tokens = 128
    stop = ("\n",)

    def load_split(self, split: str) -> list[GenExample]:
        if split in self.data:
            rows, replaced = self.rows(split, "")
        else:
            path = dataset_dir() / "pairs.jsonl"
            rows, replaced = [(f"{path}:{n}", r) for n, r in iter_jsonl(path)], False
        out = []
        for where, r in rows:
            if not replaced and r.get("split") != split:
                continue
            question = self.field(r, "question", str, where).strip()
            query = self.field(r, "query", str, where).strip()
            prompt = f"SQLite tables:\n{PROMPT_SCHEMA}\nQuestion: {question}\nSQL:"
            ex_id = str(r.get("id", where))
            intent = r.get("intent")  # the question template: items of one intent are not independent
            meta = {"where": where}
            cluster = str(intent) if isinstance(intent, str) and intent else ex_id
            out.append(GenExample(ex_id, prompt, " " + query, [query], meta, cluster))
        return out

    def check(self, examples: Sequence[GenExample]) -> None:
        """Every gold query must run before any generation: a broken one is named with its file and line."""
        db = sqlmetric.Isolated(dataset_dir() / "insurance.sqlite")
        for ex in examples:
            error = db.check_gold(ex.references[0], TIMEOUT_S)
            if error is not None:
                raise UserError(
                    f"{ex.meta.get('where', ex.id)}: the gold query does not run on the insurance database "
                    f"({error}): fix or remove that line"
                )

    def score(self, examples: Sequence[GenExample], outputs: Sequence[Any]) -> tuple[dict[str, Any], list[dict]]:
        db = sqlmetric.Isolated(dataset_dir() / "insurance.sqlite")
        records = []
        for ex, text in zip(examples, outputs, strict=True):
            pred = str(text).strip()
            ok, why = db.match(pred, ex.references[0], TIMEOUT_S)
            records.append({"id": ex.id, "prediction": pred, "gold": ex.references[0], "correct": ok, "error": why})
        n = max(1, len(records))
        errors = sum(r["error"] not in (None, "different rows") for r in records)
        exact = sum(r["prediction"].rstrip(";").strip() == r["gold"].rstrip(";").strip() for r in records)
        return {
            "execution_accuracy": sum(r["correct"] for r in records) / n,
            "exact_string": exact / n,
            "execution_errors": errors,
        }, records
