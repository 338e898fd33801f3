"""The comparison table and plot (`edkm compare`), from benchmarks/results/compare_*bit.json.

    python scripts/compare_table.py            # print the table
    python scripts/compare_table.py --readme   # rewrite the <!-- compare table --> section wherever it is
                                               # (README.md, docs/*.md; today docs/results.md) and compare.png
                                               # (--docs is the same flag)

Files are written only when they change, so a second run changes nothing.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

# after the sys.path tweak on purpose: the script runs from a checkout without installing edkm
from edkm.jobs.compare_report import compare_table, write_plot  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


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


if __name__ == "__main__":
    table = compare_table(RESULTS)
    if sys.argv[1:] in (["--readme"], ["--docs"]):
        write_plot(RESULTS)
        for path in rewrite_sections({"compare": table}):
            print(f"rewrote {path.relative_to(ROOT)}", file=sys.stderr)
    else:
        print(table)
