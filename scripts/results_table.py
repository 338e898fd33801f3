"""Print the README's results tables from the committed JSON results.

    python scripts/results_table.py            # reads benchmarks/results/compress_*.json and memory.json
"""

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def compress_table() -> str:
    rows = ["| bits (decoder / embedding) | fp32 original | fp32 fine-tuned (control) | RTN per channel | k-means per tensor (PTQ) | **eDKM** (hard, packed, reloaded) | eDKM vs control | packed size |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for path in sorted(RESULTS.glob("compress_*.json")):
        r = json.loads(path.read_text())
        embed = r["plan"]["overrides"].get("embed_tokens|lm_head", {}).get("bits", r["bits"])
        gap = r["edkm_ppl"] / r["fp_finetuned_ppl"] - 1
        rows.append(f"| {r['bits']} / {embed} | {r['fp_ppl']:.3f} | {r['fp_finetuned_ppl']:.3f} | {r['rtn_ppl']:.3f} | "
                    f"{r['kmeans_ptq_ppl']:.3f} | **{r['edkm_ppl']:.3f}** | {gap:+.1%} | "
                    f"{r['size_bytes'] / 1e3:.0f} kB (fp16 {r['fp_size_bytes'] / 1e3:.0f} kB) |")
    return "\n".join(rows)


def memory_table() -> str:
    path = RESULTS / "memory.md"
    return path.read_text() if path.is_file() else "(run `edkm bench memory`)"


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("all", "compress"):
        print(compress_table())
    if which in ("all", "memory"):
        print(memory_table())
