"""The text-to-SQL stand-in: a generated insurance SQLite database and question → SQL pairs.

Built once per (version, seed) into the fanlora cache (``$FANLORA_CACHE`` or ``~/.cache/fanlora``): the
database and ``pairs.jsonl`` are written in a temporary folder that is renamed into place, so an interrupted
build leaves nothing half-made. Splits are assigned by a hash of the gold SQL (80/10/10), so the same query
in other words never sits in both train and test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from fanlora.sqlgen.database import PROMPT_SCHEMA, build_database
from fanlora.sqlgen.questions import generate_pairs

VERSION = 1
N_PAIRS = 4000

__all__ = ["PROMPT_SCHEMA", "build", "dataset_dir"]


def split_of(sql: str) -> str:
    bucket = int(hashlib.sha256(sql.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


def build(out_dir: str | Path, seed: int = 0, n_pairs: int = N_PAIRS) -> Path:
    """Write ``insurance.sqlite``, ``pairs.jsonl`` and ``info.json`` into ``out_dir`` (made atomically)."""
    out = Path(out_dir)
    if (out / "info.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts = build_database(tmp / "insurance.sqlite", seed)
        conn = sqlite3.connect(str(tmp / "insurance.sqlite"))
        pairs = generate_pairs(conn, n_pairs, seed)
        conn.close()
        splits: dict[str, int] = {}
        with open(tmp / "pairs.jsonl", "w", encoding="utf-8") as fh:
            for i, p in enumerate(pairs):
                split = split_of(p.sql)
                splits[split] = splits.get(split, 0) + 1
                row = {"id": f"sql-{i}", "question": p.question, "query": p.sql, "intent": p.intent, "split": split}
                fh.write(json.dumps(row) + "\n")
        info = {"version": VERSION, "seed": seed, "tables": counts, "pairs": len(pairs), "splits": splits}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same build first
            if not (out / "info.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def dataset_dir(seed: int = 0) -> Path:
    """The cached build for ``seed``, made on first use (about a second)."""
    root = Path(os.environ.get("FANLORA_CACHE", Path.home() / ".cache" / "fanlora"))
    return build(root / f"sql-insurance-v{VERSION}-seed{seed}", seed)
