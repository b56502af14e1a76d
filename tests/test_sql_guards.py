"""Hostile SQL from a model must not change later examples' gold results, nor escape the time and size limits."""

from __future__ import annotations

import json
import sqlite3

import pytest
from helpers import fail

from fanlora.metrics import sql
from fanlora.stages import evaluate as adapt
from fanlora.tasks import get_task
from fanlora.tasks.base import GenExample


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "t.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE claims (id INTEGER PRIMARY KEY, amount REAL);"
        "INSERT INTO claims VALUES (1, 100.0), (2, 250.5), (3, 75.25);"
    )
    conn.commit()
    conn.close()
    return path


def test_a_prediction_cannot_shadow_a_table_on_a_shared_connection(db):
    conn = sql.connect_read_only(db)
    for hostile in (
        "PRAGMA query_only = 0",
        "CREATE TEMP TABLE claims AS SELECT * FROM main.claims WHERE 0",
        "CREATE TEMP VIEW claims AS SELECT 1 AS id, 0.0 AS amount",
        "PRAGMA writable_schema = 1",
    ):
        ok, why = sql.execution_match(conn, hostile, "SELECT 1")
        assert not ok and "not authorized" in why, (hostile, why)
    # the gold still sees the real table: a prediction of 0 rows is wrong, the true count right
    assert sql.execution_match(conn, "SELECT 0", "SELECT count(*) FROM claims") == (False, "different rows")
    assert sql.execution_match(conn, "SELECT 3", "SELECT count(*) FROM claims") == (True, None)


def test_the_sql_task_isolates_every_example_on_the_real_database():
    task = get_task("sql")
    gold = "SELECT count(*) FROM claims"
    exs = [GenExample(str(i), "q", "", [gold]) for i in range(4)]
    outputs = [
        "PRAGMA query_only=0",
        "CREATE TEMP TABLE claims AS SELECT * FROM main.claims WHERE 0",
        "SELECT 0",  # right only if the temp table had shadowed claims
        gold,
    ]
    _, preds = task.score(exs, outputs)
    assert [p["correct"] for p in preds] == [False, False, False, True]


def test_value_size_and_result_size_are_capped(db):
    conn = sql.connect_read_only(db)
    for hostile in ("SELECT randomblob(300000000)", "SELECT zeroblob(400000000), zeroblob(400000000)"):
        ok, why = sql.execution_match(conn, hostile, "SELECT 1", timeout_s=0.5)
        assert not ok and "too big" in why, why
    wide = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 30000) "
        "SELECT x, printf('%.1000c', 'a') FROM c"
    )
    result = sql.execute(conn, wide, timeout_s=5.0)
    assert result.rows is None and "bytes" in result.error
    assert sql.PROGRESS_STEPS <= 1000  # the clock is read often enough for a 0.5 s limit


def test_a_broken_gold_query_stops_before_the_model_loads(tmp_path, tiny_llama, capsys, monkeypatch):
    data = tmp_path / "test.jsonl"
    rows = [
        {"question": "How many claims?", "query": "SELECT count(*) FROM claims"},
        {"question": "Broken", "query": "SELECT amount FROM nowhere"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the gold queries were checked")

    monkeypatch.setattr(adapt, "load_for_eval", no_model)
    out = tmp_path / "eval"
    argv = ["evaluate", "--task", "sql", "--base", "--backbone", str(tiny_llama), "--data", f"test={data}"]
    err = fail(capsys, [*argv, "--out", str(out)])
    assert f"{data}:2" in err and "gold query" in err and "no such table" in err
    assert not out.exists()


def test_the_result_cap_is_checked_row_by_row(db):
    """Rows of ~1 MB each: the cap (20 MB) must stop the fetch after ~20 rows, not after a batch of 1,000."""
    import tracemalloc

    conn = sql.connect_read_only(db)
    huge = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 2000) SELECT zeroblob(999999) FROM c"
    tracemalloc.start()
    try:
        result = sql.execute(conn, huge, timeout_s=30.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.rows is None and "bytes" in result.error
    assert peak < 100_000_000, peak  # measured ~21 MB row by row; ~1 GB with 1,000-row batches
