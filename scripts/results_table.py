"""The main job's and the memory benchmark's results tables, from the committed JSON results.

    python scripts/results_table.py            # print them (benchmarks/results/compress_*.json, memory.md)
    python scripts/results_table.py --readme   # rewrite them between their markers in README.md and docs/*.md
                                               # (--docs is the same flag)

The compress table is in README.md and docs/results.md, the memory and kernels tables in docs/results.md; every
`<!-- NAME table -->` ... `<!-- /NAME table -->` section found is rewritten, files are written only
when they change, so a second run changes nothing.
"""

import json
import sys
from pathlib import Path

from doc_sections import rewrite_sections  # scripts/doc_sections.py: one writer for the three scripts

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def compress_table() -> str:
    rows = [
        "| bits (decoder / embedding) | fp32 original | fp32 fine-tuned (control) | RTN per channel "
        "| k-means per tensor (PTQ) | GPTQ per channel | SqueezeLLM-style per row "
        "| **eDKM** (hard, packed, reloaded) | eDKM vs control | packed size | split |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    peer = lambda r, k: f"{r[k + '_ppl']:.3f} ({r[k + '_bpw']:.2f} b/w)" if r.get(k + "_ppl") else "-"
    for path in sorted(RESULTS.glob("compress_*.json")):
        r = json.loads(path.read_text())
        embed = next(iter(r["plan"]["overrides"].values()), {}).get("bits", r["bits"])  # the --embed-bits override
        gap = r["edkm_ppl"] / r["fp_finetuned_ppl"] - 1
        rows.append(
            f"| {r['bits']} / {embed} | {r['fp_ppl']:.3f} | {r['fp_finetuned_ppl']:.3f} | {r['rtn_ppl']:.3f} | "
            f"{r['kmeans_ptq_ppl']:.3f} | {peer(r, 'gptq')} | {peer(r, 'squeeze')} | "
            f"**{r['edkm_ppl']:.3f}** | {gap:+.1%} | "
            f"{r['size_bytes'] / 1e3:.0f} kB (fp16 {r['fp_size_bytes'] / 1e3:.0f} kB) | "
            f"{r.get('eval_split', 'held-out 20 % (before the split)')} |"
        )
    return "\n".join(rows)


def memory_table() -> str:
    """The measured table and the target checks of memory.md (without its header and notes)."""
    path = RESULTS / "memory.md"
    if not path.is_file():
        return "(run `edkm bench memory`)"
    text = path.read_text()
    start = text.index("| config")
    return text[start : text.index("## Notes")].replace("## Targets", "Targets:").strip()


def kernels_table() -> str:
    """The native GEMV benchmark (benchmarks/results/kernels.md, written by `edkm bench kernels`)."""
    path = RESULTS / "kernels.md"
    return path.read_text().strip() if path.is_file() else "(run `edkm bench kernels`)"


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("--readme", "--docs"):
        tables = {"compress": compress_table(), "memory": memory_table(), "kernels": kernels_table()}
        for path in rewrite_sections(tables):
            print(f"rewrote {path.relative_to(ROOT)}", file=sys.stderr)
        sys.exit()
    if which in ("all", "compress"):
        print(compress_table())
    if which in ("all", "memory"):
        print(memory_table())
