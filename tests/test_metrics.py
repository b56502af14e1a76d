"""Task metrics pinned to hand-computed cases."""

from __future__ import annotations

import sqlite3
from decimal import Decimal

import pytest

from fanlora.metrics import gsm8k, sql, squad


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple, a pear & THE plum.", "apple pear plum"),
        ("Theory of the theatre", "theory of theatre"),  # only whole-word articles go
        ("  1,000 — 2.5%  ", "1000 — 25"),  # ASCII punctuation only: the em dash stays
        ("A", ""),
    ],
)
def test_squad_normalisation(text, normal):
    assert squad.normalize(text) == normal


def test_squad_em_f1_by_hand():
    # pred "the big red car" → [big, red, car]; gold "a red car" → [red, car]: P = 2/3, R = 1, F1 = 0.8
    assert squad.f1("the big red car", "a red car") == pytest.approx(0.8)
    assert squad.exact_match("The red car.", "red car") == 1.0
    assert squad.f1("blue", "red car") == 0.0
    # repeated tokens count once per match: pred [a.. ] "red red" vs gold "red": P = 1/2, R = 1 → 2/3
    assert squad.f1("red red", "red") == pytest.approx(2 / 3)
    # maximum over gold answers
    assert squad.best("Denver Broncos", ["Broncos", "Denver Broncos", "the Broncos"]) == (1.0, 1.0)
    result = squad.f1_em(["red car", "blue"], [["a red car"], ["green"]])
    assert result["exact_match"] == 50.0 and result["f1"] == 50.0 and result["f1_em"] == 50.0


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Natalia sold 48+24 = 72 clips.\n#### 72", Decimal(72)),
        ("#### 1,234", Decimal(1234)),
        ("So she pays $1,234.50 in total.", Decimal("1234.5")),
        ("The temperature drops to -7 degrees.", Decimal(-7)),
        ("He runs 3 laps of 400 m, so 1200 meters", Decimal(1200)),
        ("The answer is 3.50 dollars", Decimal("3.5")),
        ("no number here", None),
        ("#### -15", Decimal(-15)),
    ],
)
def test_gsm8k_extraction(text, value):
    assert gsm8k.extract(text) == value


def test_gsm8k_correct():
    gold = "First 2 + 3 = 5.\n#### 5"
    assert gsm8k.correct("2 + 3 makes 5.0", gold)
    assert not gsm8k.correct("I think it is 6", gold)
    assert not gsm8k.correct("five", gold)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "t.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE claims (id INTEGER PRIMARY KEY, policy INTEGER, amount REAL, status TEXT);
        INSERT INTO claims VALUES (1, 10, 100.0, 'open'), (2, 10, 250.5, 'closed'), (3, 11, 100.0, NULL),
                                  (4, 12, 75.25, 'open');
        """
    )
    conn.commit()
    conn.close()
    return path


def test_sql_result_comparison_rules(db):
    conn = sql.connect_read_only(db)
    gold = "SELECT amount FROM claims WHERE policy = 10"
    assert sql.execution_match(conn, "SELECT amount FROM claims WHERE policy=10 ORDER BY amount DESC", gold)[0]
    # ORDER BY in the gold: order matters
    ordered = "SELECT id FROM claims ORDER BY amount"
    assert not sql.execution_match(conn, "SELECT id FROM claims ORDER BY amount DESC", ordered)[0]
    # duplicates count: a multiset, not a set
    assert not sql.execution_match(conn, "SELECT DISTINCT amount FROM claims", "SELECT amount FROM claims")[0]
    # NULLs compare equal to NULLs
    assert sql.execution_match(conn, "SELECT status FROM claims WHERE id = 3", "SELECT NULL")[0]
    # type affinity: integer 100 vs real 100.0, and two ways of averaging
    assert sql.execution_match(conn, "SELECT CAST(amount AS INTEGER) FROM claims WHERE id = 1", "SELECT 100")[0]
    assert sql.execution_match(conn, "SELECT SUM(amount) / COUNT(*) FROM claims", "SELECT AVG(amount) FROM claims")[0]
    # but a string is not a number
    assert not sql.execution_match(conn, "SELECT '100'", "SELECT 100")[0]


def test_sql_errors_timeouts_and_writes_are_wrong_not_fatal(db):
    conn = sql.connect_read_only(db)
    ok, why = sql.execution_match(conn, "SELEC amount FROM claims", "SELECT 1")
    assert not ok and "syntax" in why
    ok, why = sql.execution_match(conn, "DELETE FROM claims", "SELECT 1")
    assert not ok and "not authorized" in why
    ok, why = sql.execution_match(conn, "DROP TABLE claims", "SELECT 1")
    assert not ok
    slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    ok, why = sql.execution_match(conn, slow, "SELECT 1", timeout_s=0.2)
    assert not ok and "interrupt" in why.lower()
    ok, why = sql.execution_match(conn, f"ATTACH DATABASE '{db.parent / 'new.db'}' AS x", "SELECT 1")
    assert not ok and not (db.parent / "new.db").exists()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM claims").fetchone() == (4,)


def test_sql_empty_prediction_is_wrong_even_when_the_gold_is_empty(db):
    conn = sql.connect_read_only(db)
    empty_gold = "SELECT amount FROM claims WHERE 1 = 0"
    assert sql.execution_match(conn, "", empty_gold) == (False, "empty prediction")
    assert sql.execution_match(conn, " ; ", empty_gold) == (False, "empty prediction")
    assert sql.execution_match(conn, "SELECT amount FROM claims WHERE amount < 0", empty_gold) == (True, None)
