"""Artifact file I/O. Writes are atomic: a reader (or an interrupted run) never sees a half-written file.

Everything fanlora writes goes to a temporary file in the target's directory and is then renamed over the
target; ``os.replace`` is atomic on POSIX and Windows when source and target share a file system.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def read_artifact(path: str | Path, fmt: str, what: str, command: str) -> dict[str, Any]:
    """Read a fanlora JSON artifact of format ``fmt``; every way it can be wrong is one clear UserError."""
    from fanlora.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist: run `{command}` first or fix the path")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}): re-run `{command}`") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UserError(f"{path} is not a fanlora {what} file (format {fmt} expected)")
    return data


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Write pretty JSON atomically (sorted keys are *not* forced: field order is part of readability)."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write JSON Lines atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
