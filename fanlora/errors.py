"""User-facing errors.

A :class:`UserError` is a problem with what the user gave us (a path, a file, a flag), not a bug. The CLI
prints its message as one line and exits with status 2, so every message must name the problem *and* the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the CLI prints ``error: <message>`` and exits 2, without a traceback."""
