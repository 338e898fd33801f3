"""The README's FSDP tables from the committed JSON results (sharded DKM benchmark, `edkm plan`).

    python scripts/fsdp_tables.py            # print them
    python scripts/fsdp_tables.py --readme   # rewrite the tables between the README's markers
"""

import json
import sys
from pathlib import Path

from edkm.bench.sharded_dkm import markdown as fsdp_dkm_table
from edkm.bench.plan_check import table as validation_table

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
GPUS = (1, 2, 4, 8)


def plan_table() -> str:
    plans = {n: json.loads((RESULTS / f"plan_llama7b_{n}gpu.json").read_text()) for n in GPUS}
    o = plans[1]["options"]
    head = (f"LLaMA-7B, {o['bits']}-bit decoder / {o['embed_bits']}-bit embedding and output layer, batch {o['batch']} x "
            f"{o['seq']} tokens per GPU, bf16 compute, AdamW with fp32 master weights, GPUs of {o['gpu_memory_gib']:g} GiB; "
            "per-GPU peak in GiB (fits?), host memory in brackets where a mode offloads")
    lines = [head, "", "| mode | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in GPUS) + " |",
             "| --- |" + " ---: |" * len(GPUS)]
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


def update_readme() -> None:
    readme = RESULTS.parent.parent / "README.md"
    text = readme.read_text()
    for name, table in tables().items():
        start, end = f"<!-- {name} table -->", f"<!-- /{name} table -->"
        a, b = text.index(start) + len(start), text.index(end)
        text = text[:a] + "\n" + table + "\n" + text[b:]
    readme.write_text(text)


if __name__ == "__main__":
    if "--readme" in sys.argv:
        update_readme()
    else:
        print("\n\n".join(tables().values()))
