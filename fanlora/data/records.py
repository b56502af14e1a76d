"""Read JSONL / JSONL.gz files (or HF datasets) into records, naming the file and line of any bad row."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from fanlora.errors import UserError

BUNDLED_PREFIX = "bundled:"


def bundled_path(name: str) -> Path:
    """``bundled:instruct/gpteacher_codegen`` → the file shipped in ``fanlora/bundled`` (.jsonl or .jsonl.gz)."""
    root = Path(str(resources.files("fanlora") / "bundled"))
    for suffix in (".jsonl", ".jsonl.gz", ""):
        path = root / f"{name}{suffix}"
        if path.is_file():
            return path
    known = sorted(str(p.relative_to(root)).split(".")[0] for p in root.rglob("*.jsonl*"))
    raise UserError(f"no bundled dataset {name!r}: known ones are {', '.join(known)}")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record); a line that is not a JSON object stops with the file and line named."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist: give an existing .jsonl or .jsonl.gz file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def read_source(source: str, split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """Records of one source as (where, record); ``where`` is ``file:line`` for error messages.

    A source is ``bundled:<name>``, a local ``.jsonl``/``.jsonl.gz`` path, or an HF dataset (online only) as
    ``NAME[:CONFIG][@SPLIT]`` — e.g. ``super_glue:boolq@train``; ``split`` is used when ``@SPLIT`` is absent.
    A bundled or local source may end in a row range ``[START:END]`` (records in file order, Python slice
    semantics) — e.g. ``bundled:boolq/val[0:1571]`` — so one file can feed two disjoint splits; HF datasets
    take the same syntax in ``@SPLIT`` natively (``@train[:1000]``).
    """
    ranged = _RANGE.search(source)
    if ranged and not _is_hf(source[: ranged.start()]):
        start, end = (int(v) if v else None for v in ranged.groups())
        rows = read_source(source[: ranged.start()], split)
        picked = rows[start:end]
        if not picked:
            raise UserError(f"{source}: the row range selects nothing ({len(rows)} records in the source)")
        return picked
    if source.startswith(BUNDLED_PREFIX):
        path = bundled_path(source[len(BUNDLED_PREFIX) :])
        return [(f"{path}:{n}", r) for n, r in iter_jsonl(path)]
    path = Path(source).expanduser()
    if path.exists() or source.endswith((".jsonl", ".jsonl.gz", ".gz")):
        return [(f"{path}:{n}", r) for n, r in iter_jsonl(path)]
    return _read_hf(source, split)


_RANGE = re.compile(r"\[(\d*):(\d*)\]$")


def _is_hf(source: str) -> bool:
    if source.startswith(BUNDLED_PREFIX):
        return False
    return not (Path(source).expanduser().exists() or source.endswith((".jsonl", ".jsonl.gz", ".gz")))


def _read_hf(source: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    name, _, at = source.partition("@")
    split = at or split
    name, _, config = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"cannot load dataset {name!r} split {split!r} ({first}); give a local .jsonl/.jsonl.gz "
            "file, a bundled:<name> source, or an HF dataset name while online"
        ) from None
    return [(f"{name}[{split}]#{i}", dict(r)) for i, r in enumerate(ds)]
