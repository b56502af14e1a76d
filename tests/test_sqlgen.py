"""The generated SQL task: the same seed gives the same database and pairs."""

from __future__ import annotations

from fanlora.sqlgen import dataset_dir


def test_sql_dataset_is_the_same_for_the_same_seed(tmp_path):
    import json

    from fanlora.sqlgen import build

    a, b = build(tmp_path / "a", seed=0), build(tmp_path / "b", seed=1)
    cached = dataset_dir(0)
    assert (a / "pairs.jsonl").read_bytes() == (cached / "pairs.jsonl").read_bytes()
    assert (a / "pairs.jsonl").read_bytes() != (b / "pairs.jsonl").read_bytes()
    info = json.loads((a / "info.json").read_text())
    assert info["pairs"] >= 3000 and info["tables"]["customers"] == 2000 and info["tables"]["claims"] > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    rows = [json.loads(line) for line in (a / "pairs.jsonl").read_text().splitlines()]
    assert len({r["question"] for r in rows}) == len(rows) and len({r["intent"] for r in rows}) >= 20
    assert any("JOIN" in r["query"] and "GROUP BY" in r["query"] for r in rows)
    assert any("strftime" in r["query"] for r in rows) and any("ORDER BY" in r["query"] for r in rows)


def test_the_database_is_built_from_one_seed_in_a_fixed_order_of_draws(tmp_path):
    import sqlite3

    from fanlora.sqlgen.database import build_database

    counts = build_database(tmp_path / "a.db", seed=0)
    assert counts == {
        "agents": 60, "customers": 2000, "policies": 3683, "coverages": 8498, "claims": 2034, "payments": 16070,
    }  # fmt: skip
    build_database(tmp_path / "b.db", seed=0)
    dump = ["\n".join(sqlite3.connect(tmp_path / n).iterdump()) for n in ("a.db", "b.db")]
    assert dump[0] == dump[1]
