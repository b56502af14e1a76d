"""Execution accuracy for text-to-SQL: a prediction is right iff it runs and returns the gold's rows.

Rows are compared as a multiset (duplicates count, order does not) unless the gold query has an ORDER BY,
in which case order matters too. SQLite may return 3 or 3.0 for the same value depending on the
expression; those compare equal (Python's 3 == 3.0, with equal hashes), and floats are rounded to 6
decimals so that two ways of computing an average agree. The database is opened read-only and with
``query_only`` on, and ATTACH is denied, so a prediction that tries to write fails like any other error;
a progress handler aborts a query that runs past its time limit. Errors and time-outs are wrong answers,
never exceptions.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


@dataclass
class Execution:
    rows: list[tuple[Any, ...]] | None
    error: str | None = None


def connect_read_only(db_path: str | Path) -> sqlite3.Connection:
    """A connection that cannot change the database, whatever SQL it is given."""
    path = Path(db_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no SQLite database at {path}")
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")
    # ATTACH would open (and create) another file, outside both guards above
    denied = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH}
    conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY if action in denied else sqlite3.SQLITE_OK)
    return conn


def execute(conn: sqlite3.Connection, query: str, timeout_s: float = 5.0, max_rows: int = 100_000) -> Execution:
    """Run one query with a time limit; any failure is reported, not raised."""
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        cursor = conn.execute(query)
        rows = cursor.fetchmany(max_rows + 1)
        if len(rows) > max_rows:
            return Execution(None, f"more than {max_rows} rows")
        return Execution([tuple(r) for r in rows])
    except sqlite3.Error as exc:  # includes "interrupted" (time-out) and "attempt to write a readonly database"
        return Execution(None, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # e.g. a Python-level overflow converting a value
        return Execution(None, f"{type(exc).__name__}: {exc}")
    finally:
        conn.set_progress_handler(None, 0)


def _norm(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) + 0.0  # + 0.0 turns -0.0 into 0.0
    return value


def same_result(predicted: list[tuple[Any, ...]], gold: list[tuple[Any, ...]], ordered: bool) -> bool:
    p = [tuple(_norm(v) for v in row) for row in predicted]
    g = [tuple(_norm(v) for v in row) for row in gold]
    return p == g if ordered else Counter(p) == Counter(g)


def is_ordered(query: str) -> bool:
    """Whether row order is part of the answer: the gold query sorts."""
    return bool(_ORDER_BY.search(query))


def execution_match(
    conn: sqlite3.Connection, predicted: str, gold: str, timeout_s: float = 5.0
) -> tuple[bool, str | None]:
    """(right?, why not) for one prediction; the gold query must run."""
    gold_run = execute(conn, gold, timeout_s)
    if gold_run.rows is None:
        raise ValueError(f"the gold query fails: {gold_run.error}: {gold}")
    if not predicted.strip().rstrip(";").strip():  # SQLite runs "" happily and returns no rows
        return False, "empty prediction"
    pred_run = execute(conn, predicted, timeout_s)
    if pred_run.rows is None:
        return False, pred_run.error
    ok = same_result(pred_run.rows, gold_run.rows, is_ordered(gold))
    return ok, None if ok else "different rows"
