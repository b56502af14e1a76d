"""Artifact file I/O. Writes are atomic: a reader (or an interrupted run) never sees a half-written file.

Everything fanlora writes goes to a temporary file in the target's directory and is then renamed over the
target; ``os.replace`` is atomic on POSIX and Windows when source and target share a file system. The
directory is fsynced after the rename, so the new name survives a power cut too.

``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 directories; a published artifact gets the
modes a plain ``open``/``mkdir`` would give under the process's umask (usually 0644/0755), so that another
user — a separate serving account, a reviewer — can read what a run wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from fanlora.errors import UserError

MAX_ARTIFACT_BYTES = 256 * 1024 * 1024  # far above any artifact fanlora writes


def read_json(path: str | Path, fix: str, max_bytes: int = MAX_ARTIFACT_BYTES) -> Any:
    """The JSON value in ``path``; a file that is too large, not UTF-8, not JSON or nested too deeply is one
    UserError naming the file and ``fix`` (what the user should do)."""
    return _read_json(Path(path), fix, max_bytes)[0]


def _read_json(path: Path, fix: str, max_bytes: int) -> tuple[Any, bytes]:
    """:func:`read_json`'s value and the bytes it was parsed from (one read: a digest of them names the file)."""
    if path.stat().st_size > max_bytes:
        raise UserError(f"{path} is over {max_bytes:,} bytes, too large for what it should hold: {fix}")
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8")), raw
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: {fix}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}): {fix}") from None
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be a fanlora file: {fix}") from None


def read_artifact(path: str | Path, fmt: str, what: str, command: str) -> dict[str, Any]:
    """Read a fanlora JSON artifact of format ``fmt``; every way it can be wrong is one clear UserError."""
    return read_artifact_digest(path, fmt, what, command)[0]


def read_artifact_digest(path: str | Path, fmt: str, what: str, command: str) -> tuple[dict[str, Any], str]:
    """:func:`read_artifact` and the SHA-256 of the bytes it read (a run records its inputs' digests)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist: run `{command}` first or fix the path")
    data, raw = _read_json(path, f"re-run `{command}`", MAX_ARTIFACT_BYTES)
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UserError(f"{path} is not a fanlora {what} file (format {fmt} expected)")
    return data, hashlib.sha256(raw).hexdigest()


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask (reading it means setting it: done under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def publish_tree(path: str | Path) -> None:
    """Give a directory made by ``mkdtemp`` (and everything in it) the modes ``mkdir``/``open`` would give."""
    mask = umask()
    root = Path(path)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
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


def write_weights(
    directory: str | Path, weights: dict[str, Any], weights_name: str, config_name: str, config: Any
) -> Path:
    """A baseline adapter's files: its tensors as safetensors, then its config as JSON (each atomically), in
    ``directory`` (made if missing). The config goes last: its presence marks a complete adapter."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (weights_name + ".tmp")
    save_file({n: t.detach().contiguous() for n, t in weights.items()}, str(tmp))
    tmp.replace(directory / weights_name)
    write_json(directory / config_name, config)
    return directory


def read_weights(directory: str | Path, weights_name: str, config_name: str, what: str) -> tuple[Any, dict[str, Any]]:
    """The config and tensors :func:`write_weights` wrote; a directory without the config is refused."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / config_name).is_file():
        raise UserError(f"{directory} holds no {what} adapter ({config_name} missing)")
    return json.loads((directory / config_name).read_text()), load_file(str(directory / weights_name))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (run identity: a run records the digests of its inputs)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
