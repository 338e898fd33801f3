"""Rewrite the generated sections of README.md and docs/*.md: one writer for every table script.

A section is the text between ``<!-- NAME table -->`` and ``<!-- /NAME table -->``, each marker on a line of its
own; files are written only when they change, so a second run changes nothing.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rewrite_sections(tables: dict[str, str]) -> list[Path]:
    """Replace every `<!-- NAME table -->` section of README.md and docs/*.md; returns the files changed."""
    found, changed = set(), []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = new = path.read_text()
        for name, table in tables.items():
            begin, end = f"<!-- {name} table -->", f"<!-- /{name} table -->"
            section = re.compile(
                f"^{re.escape(begin)}$.*?^{re.escape(end)}$", re.DOTALL | re.MULTILINE
            )  # markers on lines of their own
            if section.search(new):
                found.add(name)
                body = begin + "\n" + table + "\n" + end
                new = section.sub(lambda _, body=body: body, new)  # a function: the table is not a template
        if new != text:
            path.write_text(new)
            changed.append(path)
    if missing := sorted(set(tables) - found):
        sys.exit(f"no <!-- NAME table --> section for {missing} in README.md or docs/*.md")
    return changed
