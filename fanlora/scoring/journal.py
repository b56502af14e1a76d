"""Finished work, appended line by line, so a killed scoring run resumes without recomputing it.

Each process (rank or shard) appends to its own ``<stem>.partial.<rank>.jsonl``; a (re)starting process
reads *all* of them, so a run may resume under a different number of processes. The first line of every
file is a header naming what is being scored (backbone, adapter, validation set, method and its options):
a file with another header is refused, never mixed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fanlora import atomic
from fanlora.errors import UserError

PARTIAL_FORMAT = "fanlora-scores-partial/2"


def _read(path: Path, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    lines = path.read_text().splitlines()
    if not lines:
        return done
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        first = None
    if first != header:
        raise UserError(
            f"{path} holds partial scores of another run (backbone, adapter, validation set or method differ): "
            "delete it, or score into another run directory"
        )
    for i, line in enumerate(lines[1:], 2):
        try:
            entry = json.loads(line)
            done[entry["id"]] = entry
        except (json.JSONDecodeError, KeyError, TypeError):
            if i == len(lines):  # the last line cut short by a kill: that unit is simply recomputed
                break
            raise UserError(f"{path}:{i} is corrupt: delete {path} to score from scratch") from None
    return done


class Journal:
    """The entries finished so far (by any process) and this process's append-only record."""

    def __init__(self, directory: str | Path, stem: str, header: dict[str, Any], rank: int = 0) -> None:
        self.directory = Path(directory)
        self.stem = stem
        self.header = {"format": PARTIAL_FORMAT, **header}
        self.path = self.directory / f"{stem}.partial.{rank}.jsonl"
        self.done: dict[str, dict[str, Any]] = {}
        for path in sorted(self.directory.glob(f"{stem}.partial.*.jsonl")):
            self.done.update(_read(path, self.header))
        mine = _read(self.path, self.header) if self.path.is_file() else {}
        # rewrite this process's file without a possibly cut last line, then append to it
        atomic.write_text(self.path, "".join(json.dumps(x) + "\n" for x in [self.header, *mine.values()]))
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open across the whole study

    def record(self, entry: dict[str, Any]) -> None:
        self.done[entry["id"]] = entry
        self._fh.write(json.dumps(entry) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def remove_all(self) -> None:
        """After the final table is written: every process's partial file is obsolete."""
        self.close()
        for path in self.directory.glob(f"{self.stem}.partial.*.jsonl"):
            path.unlink(missing_ok=True)
