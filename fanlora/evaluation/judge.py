"""MT-Bench judging with any OpenAI-compatible endpoint: single-answer grading (1–10) and pairwise comparison.

The prompts are MT-Bench's own (FastChat's ``judge_prompts.jsonl``, bundled): ``single-v1`` for turn 1,
``single-v1-multi-turn`` for turn 2, and the ``-math`` variants with GPT-4's reference answer for the math,
reasoning and coding questions, as FastChat does; pairwise uses ``pair-v2`` and judges both orders (A/B and
B/A), counting a win only when the two verdicts agree and a tie otherwise (FastChat's rule against position
bias). Judgments are appended to a file as they arrive, so a re-run continues where the last one stopped; the
answers are never touched; a judgment counts only for the judge model that made it (judging the same answers
with another judge asks that judge, into the same file). An endpoint that cannot be reached, or that never
answers with a rating, stops with one line and exit status 2.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fanlora import atomic
from fanlora.data.records import BUNDLED_PREFIX, iter_jsonl, read_source
from fanlora.errors import UserError
from fanlora.tasks.mtbench import references

NEED_REFERENCE = ("math", "reasoning", "coding")
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")

Ask = Callable[[str, str], str]  # (system prompt, user prompt) → the judge's reply


def prompts() -> dict[str, dict[str, str]]:
    return {r["name"]: r for _, r in read_source(BUNDLED_PREFIX + "mt_bench/judge_prompts")}


def rating(reply: str) -> float | None:
    """The 1–10 rating in a judge reply ("Rating: [[7]]"), or None when there is none."""
    found = _RATING.search(reply) or _RATING_BACKUP.search(reply)
    if not found:
        return None
    value = float(found.group(1))
    return value if 1 <= value <= 10 else None


def verdict(reply: str) -> str | None:
    """ "A", "B" or "tie" from a pairwise reply, or None."""
    if "[[A]]" in reply:
        return "A"
    if "[[B]]" in reply:
        return "B"
    if "[[C]]" in reply:
        return "tie"
    return None


def read_answers(directory: str | Path) -> dict[int, dict[str, Any]]:
    """Answers saved by ``fanlora evaluate --task mtbench``, by question id."""
    path = Path(directory) / "predictions.jsonl"
    metrics = Path(directory) / "metrics.json"
    if not path.is_file() or not metrics.is_file():
        raise UserError(
            f"{directory} holds no MT-Bench answers: run `fanlora evaluate --task mtbench --out {directory}`"
        )
    if json.loads(metrics.read_text()).get("task") != "mtbench":
        raise UserError(f"{directory} holds answers of another task, not mtbench")
    out = {}
    for lineno, r in iter_jsonl(path):
        try:
            out[int(r["question_id"])] = {
                "category": r["category"],
                "turns": r["turns"],
                "answers": r["choices"][0]["turns"],
            }
        except (KeyError, IndexError, TypeError, ValueError):
            raise UserError(
                f"{path}:{lineno}: not an MT-Bench answer (question_id, category, turns, choices)"
            ) from None
    return out


def single_prompt(q: dict[str, Any], turn: int, refs: list[str], table: dict[str, dict[str, str]]) -> tuple[str, str]:
    """(system, user) for grading turn ``turn`` (1 or 2) of one question."""
    math = q["category"] in NEED_REFERENCE and refs
    name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = table[name]
    fields: dict[str, str] = {}
    if turn == 1:
        fields = {"question": q["turns"][0], "answer": q["answers"][0]}
    else:
        fields = {
            "question_1": q["turns"][0],
            "question_2": q["turns"][1],
            "answer_1": q["answers"][0],
            "answer_2": q["answers"][1],
        }
    if math:
        fields.update({f"ref_answer_{i + 1}": r for i, r in enumerate(refs[:2])})
    return p["system_prompt"], p["prompt_template"].format(**fields)


def pair_prompt(
    qa: dict[str, Any], qb: dict[str, Any], turn: int, refs: list[str], table: dict[str, dict[str, str]]
) -> tuple[str, str]:
    math = qa["category"] in NEED_REFERENCE and refs
    name = ("pair-math-v1" if math else "pair-v2") + ("-multi-turn" if turn == 2 else "")
    p = table[name]
    if turn == 1:
        fields = {"question": qa["turns"][0], "answer_a": qa["answers"][0], "answer_b": qb["answers"][0]}
    else:
        fields = {
            "question_1": qa["turns"][0],
            "question_2": qa["turns"][1],
            "answer_a_1": qa["answers"][0],
            "answer_a_2": qa["answers"][1],
            "answer_b_1": qb["answers"][0],
            "answer_b_2": qb["answers"][1],
        }
    if math:
        fields.update({f"ref_answer_{i + 1}": r for i, r in enumerate(refs[:2])})
    return p["system_prompt"], p["prompt_template"].format(**fields)


def openai_asker(url: str, model: str, api_key: str | None, timeout: float, kept: str = "") -> Ask:
    """A judge call through the ``openai`` client (any OpenAI-compatible server); errors become UserError.

    The endpoint is probed once up front (``GET /models``), so an unreachable judge is reported before any
    work starts; a server without that route is fine (any HTTP answer proves it is there).
    """
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key or "none", timeout=timeout, max_retries=2)
    try:
        client.models.list()
    except openai.APIConnectionError as exc:
        raise UserError(
            f"judge endpoint {url} cannot be reached ({exc.__class__.__name__}); check --judge-url{kept}"
        ) from None
    except openai.APIStatusError:
        pass

    def ask(system: str, user: str) -> str:
        try:
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                temperature=0.0,
                max_tokens=2048,
            )
            return reply.choices[0].message.content or ""
        except openai.APIConnectionError as exc:
            raise UserError(
                f"judge endpoint {url} cannot be reached ({exc.__class__.__name__}); check --judge-url"
            ) from None
        except openai.APIStatusError as exc:
            raise UserError(
                f"judge endpoint {url} answered HTTP {exc.status_code} for model {model!r}: {_first(exc)}"
            ) from None
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise UserError(f"judge endpoint {url} sent a reply that is not a chat completion ({exc})") from None

    return ask


def _first(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _done(path: Path, judge_model: str) -> dict[str, dict[str, Any]]:
    """This judge's earlier judgments, by question and turn; another judge's lines are kept but not reused.

    A last line cut short by a kill (no newline, not JSON) is dropped from the file, so the re-run redoes it.
    """
    if not path.is_file():
        return {}
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        try:
            json.loads(data[cut:])
            with open(path, "ab") as fh:  # whole but unterminated: terminate it before appending
                fh.write(b"\n")
        except ValueError:
            with open(path, "r+b") as fh:
                fh.truncate(cut)
    done = {}
    for _, r in iter_jsonl(path):
        if r.get("judge") == judge_model:
            done[r["key"]] = r
    return done


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def grade(answers_dir: str | Path, ask: Ask, out_dir: str | Path, judge_model: str, progress: bool = True) -> dict:
    """Single-answer grading of every turn; writes judgments.jsonl (resumable) and judge_metrics.json."""
    answers = read_answers(answers_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "judgments.jsonl"
    done = _done(path, judge_model)
    refs, table = references(), prompts()
    todo = [(qid, t) for qid in sorted(answers) for t in (1, 2) if t <= len(answers[qid]["answers"])]
    todo = [(qid, t) for qid, t in todo if f"{qid}-{t}" not in done]
    for n, (qid, turn) in enumerate(_bar(todo, "judging", progress)):
        key = f"{qid}-{turn}"
        system, user = single_prompt(answers[qid], turn, refs.get(qid, []), table)
        reply = ask(system, user)
        record = {
            "key": key,
            "question_id": qid,
            "turn": turn,
            "category": answers[qid]["category"],
            "judge": judge_model,
            "score": rating(reply),
            "judgment": reply,
        }
        if n == 0 and record["score"] is None and not any(r["score"] is not None for r in done.values()):
            raise UserError(
                f"the judge's first reply has no rating like 'Rating: [[7]]' ({reply[:60]!r}): is {judge_model!r} a "
                f"chat model that follows instructions? The answers are kept in {answers_dir}"
            )
        _append(path, record)
        done[key] = record
    rated = [r for r in done.values() if r["score"] is not None]
    if not rated:
        raise UserError(
            f"the judge answered {len(done)} times without a rating like 'Rating: [[7]]' ({path}): is "
            f"{judge_model!r} a chat model that follows instructions? The answers are kept in {answers_dir}"
        )
    metrics = _grade_metrics(rated, len(done), judge_model, answers_dir)
    atomic.write_json(out / "judge_metrics.json", metrics)
    return metrics


def _grade_metrics(rated: list[dict], n: int, judge_model: str, answers_dir: str | Path) -> dict[str, Any]:
    def mean(rows: list[dict]) -> float | None:
        return round(sum(r["score"] for r in rows) / len(rows), 4) if rows else None

    categories = sorted({r["category"] for r in rated})
    return {
        "answers": str(answers_dir),
        "judge": judge_model,
        "score": mean(rated),
        "score_turn1": mean([r for r in rated if r["turn"] == 1]),
        "score_turn2": mean([r for r in rated if r["turn"] == 2]),
        "by_category": {c: mean([r for r in rated if r["category"] == c]) for c in categories},
        "judged": len(rated),
        "unrated": n - len(rated),
    }


def compare(
    a_dir: str | Path, b_dir: str | Path, ask: Ask, out_dir: str | Path, judge_model: str, progress: bool = True
) -> dict[str, Any]:
    """Pairwise A vs B on every shared question and turn, both orders; pairwise.jsonl + pairwise_metrics.json."""
    a, b = read_answers(a_dir), read_answers(b_dir)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise UserError(f"{a_dir} and {b_dir} answer no question in common")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pairwise.jsonl"
    done = _done(path, judge_model)
    refs, table = references(), prompts()
    todo = [(qid, t) for qid in shared for t in (1, 2) if t <= min(len(a[qid]["answers"]), len(b[qid]["answers"]))]
    todo = [(qid, t) for qid, t in todo if f"{qid}-{t}" not in done]
    for n, (qid, turn) in enumerate(_bar(todo, "comparing", progress)):
        key = f"{qid}-{turn}"
        first = verdict(ask(*pair_prompt(a[qid], b[qid], turn, refs.get(qid, []), table)))
        swapped = verdict(ask(*pair_prompt(b[qid], a[qid], turn, refs.get(qid, []), table)))
        second = {"A": "B", "B": "A"}.get(swapped or "", swapped)  # back to a-vs-b terms
        agreed = first if first == second else "tie"
        winner = None if first is None or second is None else agreed
        if n == 0 and first is None and second is None and not done:
            raise UserError(
                f"the judge's first replies hold no verdict like '[[A]]': is {judge_model!r} a chat model that "
                f"follows instructions? The answers are kept in {a_dir} and {b_dir}"
            )
        record = {
            "key": key,
            "question_id": qid,
            "turn": turn,
            "category": a[qid]["category"],
            "judge": judge_model,
            "verdict_ab": first,
            "verdict_ba": second,
            "winner": {"A": "a", "B": "b"}.get(winner or "", winner),
        }
        _append(path, record)
        done[key] = record
    decided = [r for r in done.values() if r["winner"] is not None]
    if not decided:
        raise UserError(
            f"the judge never gave a verdict like '[[A]]' ({path}); the answers are kept in {a_dir} and {b_dir}"
        )
    wins_a = sum(r["winner"] == "a" for r in decided)
    wins_b = sum(r["winner"] == "b" for r in decided)
    ties = len(decided) - wins_a - wins_b
    metrics = {
        "a": str(a_dir),
        "b": str(b_dir),
        "judge": judge_model,
        "wins_a": wins_a,
        "wins_b": wins_b,
        "ties": ties,
        "win_rate_a": round(wins_a / len(decided), 4),
        "win_rate_b": round(wins_b / len(decided), 4),
        "judged": len(decided),
        "undecided": len(done) - len(decided),
    }
    atomic.write_json(out / "pairwise_metrics.json", metrics)
    return metrics


def _bar(todo: list, desc: str, progress: bool):
    """The first item runs before the progress bar appears: a judge that fails, fails with one clean line."""
    if not todo:
        return
    yield todo[0]
    yield from tqdm(todo[1:], desc=desc, disable=not progress, unit="turn", initial=1, total=len(todo))
