"""Execution accuracy for text-to-SQL: a prediction is right iff it runs and returns the gold's rows.

Rows are compared as a multiset (duplicates count, order does not) unless the gold query has an ORDER BY,
in which case order matters too. SQLite may return 3 or 3.0 for the same value depending on the
expression; those compare equal (Python's 3 == 3.0, with equal hashes), and floats are rounded to 6
decimals so that two ways of computing an average agree. Errors and time-outs are wrong answers, never
exceptions.

A prediction is model output, so it is treated as hostile. Three guards, because each alone has a hole:

- **An allow-list authorizer**: a statement may only read tables and call functions (``SELECT``, ``READ``,
  ``FUNCTION``, ``RECURSIVE``); ``PRAGMA``, ``ATTACH``, ``CREATE TEMP …``, ``INSERT`` and everything else are
  denied when the statement is prepared. A read-only file and ``query_only`` alone are not enough: a
  prediction could run ``PRAGMA query_only = 0`` and then shadow ``claims`` with an empty temp table, turning
  every later gold result into "no rows".
- **Isolation**: :func:`execution_match` runs the gold before the prediction, and :class:`Isolated` gives each
  example a fresh connection, so nothing one prediction does can reach another example's gold.
- **Resource limits**: strings and blobs are capped (``SQLITE_LIMIT_LENGTH``, so ``randomblob(3e8)`` fails at
  once instead of allocating 300 MB), the progress handler checks the clock every 1,000 VM steps (one step
  of a blob function can run long, so the length cap matters as much), and results are capped in rows and
  bytes.
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

ALLOWED_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
MAX_VALUE_BYTES = 1_000_000  # longest string or blob a query may build
MAX_SQL_BYTES = 100_000
MAX_RESULT_ROWS = 100_000
MAX_RESULT_BYTES = 20_000_000
PROGRESS_STEPS = 1_000  # VM steps between clock checks


@dataclass
class Execution:
    rows: list[tuple[Any, ...]] | None
    error: str | None = None


def _authorize(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def connect_read_only(db_path: str | Path) -> sqlite3.Connection:
    """A connection that can only read, whatever SQL it is given, with capped value sizes."""
    path = Path(db_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no SQLite database at {path}")
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.set_authorizer(_authorize)  # last: the PRAGMA above is ours
    return conn


def _size(row: tuple[Any, ...]) -> int:
    return sum(len(v) if isinstance(v, str | bytes) else 8 for v in row)


def execute(conn: sqlite3.Connection, query: str, timeout_s: float = 5.0, max_rows: int = MAX_RESULT_ROWS) -> Execution:
    """Run one query with a time limit and bounded result; any failure is reported, not raised."""
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), PROGRESS_STEPS)
    try:
        cursor = conn.execute(query)
        rows: list[tuple[Any, ...]] = []
        size = 0
        for row in cursor:  # row by row: a batch of 1,000 rows of 1 MB blobs would be 1 GB before a check
            rows.append(tuple(row))
            size += _size(row)
            if len(rows) > max_rows:
                return Execution(None, f"more than {max_rows} rows")
            if size > MAX_RESULT_BYTES:
                return Execution(None, f"result over {MAX_RESULT_BYTES} bytes")
        return Execution(rows)
    except sqlite3.Error as exc:  # includes "interrupted" (time-out), "not authorized", "string or blob too big"
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
    """(right?, why not) for one prediction; the gold query must run, and runs first."""
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


class Isolated:
    """A fresh read-only connection per example (opening one costs ~0.1 ms against a query's milliseconds)."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        connect_read_only(self.db_path).close()  # a missing database fails here, before any example

    def match(self, predicted: str, gold: str, timeout_s: float = 5.0) -> tuple[bool, str | None]:
        conn = connect_read_only(self.db_path)
        try:
            return execution_match(conn, predicted, gold, timeout_s)
        finally:
            conn.close()

    def check_gold(self, gold: str, timeout_s: float = 5.0) -> str | None:
        """Why a gold query cannot serve as a reference (it fails or returns too much), or None."""
        conn = connect_read_only(self.db_path)
        try:
            return execute(conn, gold, timeout_s).error
        finally:
            conn.close()
