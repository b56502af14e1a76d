"""The README and docs/ say only what works: every `fanlora …` command in them parses with the real argument
parser, and every file they link to exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
INLINE = re.compile(r"`(fanlora [^`]+)`")


def commands(text: str) -> list[str]:
    """`fanlora …` lines of code blocks (continuations joined) and inline code spans."""
    found, block, lines = [], False, text.replace("\\\n", " ").splitlines()
    for line in lines:
        if line.strip().startswith("```"):
            block = not block
            continue
        stripped = line.strip().removeprefix("$ ")
        if block and stripped.startswith("fanlora "):
            found.append(stripped)
        elif not block:  # prose names a command ("`fanlora serve`"); a span with options is a command line
            found += [c for c in INLINE.findall(line) if " --" in c]
    return found


def normalised(command: str) -> list[str]:
    """Drop comments, what follows a pipe or `&&`, optional `[...]` groups and `…`; placeholders become x."""
    command = re.split(r"\s+#\s|\s\|\s|\s&&\s|;\s", command)[0]
    command = re.sub(r"\[[^\]]*\]", " ", command)
    command = re.sub(r"<[^>]+>", "x", command).replace("…", "x")
    return shlex.split(command)[1:]


def cases() -> list[tuple[str, str]]:
    return [(page.name, c) for page in PAGES for c in commands(page.read_text())]


def test_the_pages_hold_commands_to_check():
    assert len(cases()) > 30


@pytest.mark.parametrize(("page", "command"), cases())
def test_every_documented_command_parses(page, command):
    from fanlora.cli import build_parser

    args = normalised(command)
    if args in ([], ["--help"]) or args[-1:] == ["--help"]:
        return
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{page}: `{command}` does not parse (exit {exc.code})")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_linked_file_exists(page):
    for target in LINK.findall(page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
