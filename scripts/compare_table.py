"""The README's comparison table and plot, from benchmarks/results/compare_*bit.json.

    python scripts/compare_table.py            # print the table
    python scripts/compare_table.py --readme   # rewrite the README section (<!-- compare table -->) and compare.png
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from edkm.jobs.compare_report import compare_table, write_plot  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

if __name__ == "__main__":
    table = compare_table(RESULTS)
    if sys.argv[1:] == ["--readme"]:
        write_plot(RESULTS)
        readme = ROOT / "README.md"
        text = readme.read_text()
        begin, end = "<!-- compare table -->", "<!-- /compare table -->"
        head, rest = text.split(begin)
        readme.write_text(head + begin + "\n" + table + "\n" + end + rest.split(end)[1])
    else:
        print(table)
