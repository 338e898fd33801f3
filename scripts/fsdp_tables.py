"""The FSDP tables from the committed JSON results (sharded DKM benchmark, `edkm plan`).

    python scripts/fsdp_tables.py            # print them
    python scripts/fsdp_tables.py --readme   # rewrite them between their markers wherever they are
                                             # (README.md, docs/*.md; today docs/distributed.md)
                                             # (--docs is the same flag)

Files are written only when they change, so a second run changes nothing.
"""

import json
import re
import sys
from pathlib import Path

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
    if "--readme" in sys.argv or "--docs" in sys.argv:
        for path in rewrite_sections(tables()):
            print(f"rewrote {path.relative_to(ROOT)}", file=sys.stderr)
    else:
        print("\n\n".join(tables().values()))
