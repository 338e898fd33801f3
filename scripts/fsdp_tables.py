"""The FSDP tables from the committed JSON results (sharded DKM benchmark, `edkm plan`).

    python scripts/fsdp_tables.py            # print them
    python scripts/fsdp_tables.py --readme   # rewrite them between their markers wherever they are
                                             # (README.md, docs/*.md; today docs/distributed.md)
                                             # (--docs is the same flag)

Files are written only when they change, so a second run changes nothing.
"""

import json
import sys
from pathlib import Path

from doc_sections import rewrite_sections  # scripts/doc_sections.py: one writer for the three scripts
from edkm.bench.plan_check import table as validation_table
from edkm.bench.sharded_dkm import markdown as fsdp_dkm_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GPUS = (1, 2, 4, 8)


def plan_table() -> str:
    plans = {n: json.loads((RESULTS / f"plan_llama7b_{n}gpu.json").read_text()) for n in GPUS}
    o = plans[1]["options"]
    head = (
        f"LLaMA-7B, {o['bits']}-bit decoder / {o['embed_bits']}-bit embedding and output layer, batch {o['batch']} x "
        f"{o['seq']} tokens per GPU, bf16 compute, AdamW with fp32 master weights, "
        f"GPUs of {o['gpu_memory_gib']:g} GiB; "
        "per-GPU peak in GiB (fits?), host memory in brackets where a mode offloads"
    )
    lines = [
        head,
        "",
        "| mode | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in GPUS) + " |",
        "| --- |" + " ---: |" * len(GPUS),
    ]
    for i, row in enumerate(plans[1]["modes"]):
        cells = []
        for n in GPUS:
            r = plans[n]["modes"][i]
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] < 1e4 else f"{r['peak_gib']:.3g}"
            host = f" [{r['host_gib']:.0f}]" if r["host_gib"] >= 0.05 else ""
            cells.append(f"{peak}{host} {'yes' if r['fits'] else '**no**'}")
        lines.append(f"| {row['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables() -> dict[str, str]:
    return {
        "fsdp_dkm": fsdp_dkm_table(json.loads((RESULTS / "fsdp_dkm.json").read_text())),
        "plan validation": validation_table(json.loads((RESULTS / "plan_validation.json").read_text())["rows"]),
        "plan llama-7b": plan_table(),
    }


if __name__ == "__main__":
    if "--readme" in sys.argv or "--docs" in sys.argv:
        for path in rewrite_sections(tables()):
            print(f"rewrote {path.relative_to(ROOT)}", file=sys.stderr)
    else:
        print("\n\n".join(tables().values()))
