"""The comparison table and plot (`edkm compare`), from benchmarks/results/compare_*bit.json.

    python scripts/compare_table.py            # print the table
    python scripts/compare_table.py --readme   # rewrite the <!-- compare table --> section wherever it is
                                               # (README.md, docs/*.md; today docs/results.md) and compare.png
                                               # (--docs is the same flag)

Files are written only when they change, so a second run changes nothing.
"""

import sys
from pathlib import Path

from doc_sections import rewrite_sections  # scripts/doc_sections.py: one writer for the three scripts

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

# after the sys.path tweak on purpose: the script runs from a checkout without installing edkm
from edkm.jobs.compare_report import compare_table, write_plot  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


if __name__ == "__main__":
    table = compare_table(RESULTS)
    if sys.argv[1:] in (["--readme"], ["--docs"]):
        write_plot(RESULTS)
        for path in rewrite_sections({"compare": table}):
            print(f"rewrote {path.relative_to(ROOT)}", file=sys.stderr)
    else:
        print(table)
