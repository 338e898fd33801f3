"""`edkm compress --fsdp` on 2 and 4 gloo processes against one process, same global batch (bundled model).

    python scripts/fsdp_compare.py --steps 20 --out benchmarks/results/fsdp_compress.json

Two comparisons, each of the default job (defaults of `edkm compress` otherwise, one thread per process):

* ``fp64``: ``--fsdp --mixed-precision fp64`` on 1, 2 and 4 processes. Compute and every gradient sum
  run in float64 over the fp32 master weights, so how the batch is split cannot change a rounding:
  the claim is equal per-step losses (1e-4 relative) and equal packed models (logits within 1e-5).
* ``fp32``: ``--fsdp`` (fp32 compute) on 2 and 4 processes against plain ``edkm compress`` in one
  process: the same algorithm, but fp32 gradient sums in another order; eDKM's 16-bit rounding of
  the master weights turns those last-bit differences into diverging steps once tau is small.

Records per comparison and process count the largest relative per-step loss difference (eDKM and
the fp control) and the largest logit difference of the packed models (relative to the largest
logit) on 4 x 64 random tokens.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import edkm

FLAGS = {"fp64": ["--fsdp", "--mixed-precision", "fp64"], "fp32": ["--fsdp"]}


def run(procs: int, out: Path, steps: int, flags: list[str]) -> dict:
    launch = (
        [sys.executable, "-m", "edkm.cli.main"]
        if procs == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(procs),
            "-m",
            "edkm.cli.main",
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [*launch, "compress", "--steps", str(steps), "--quiet", "--out", str(out), *flags], check=True, env=env
    )
    return json.loads((out / "report.json").read_text())


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def compare(name: str, work: Path, steps: int) -> dict:
    """The reference (one process: FSDP for fp64, plain for fp32) against 2 and 4 FSDP processes."""
    ref_flags = FLAGS[name] if name == "fp64" else []
    reports = {1: run(1, work / f"{name}_p1", steps, ref_flags)}
    reports.update({n: run(n, work / f"{name}_p{n}", steps, FLAGS[name]) for n in (2, 4)})
    x = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {n: edkm.load_palettized(work / f"{name}_p{n}")(x).logits for n in reports}
    ref = reports[1]
    rows = [
        {
            "processes": n,
            "max_rel_loss_diff": max_rel(reports[n]["losses"], ref["losses"]),
            "max_rel_fp_loss_diff": max_rel(reports[n]["fp_losses"], ref["fp_losses"]),
            "per_step_rel_loss_diff": [(a - b) / abs(b) for a, b in zip(reports[n]["losses"], ref["losses"])],
            "edkm_ppl": reports[n]["edkm_ppl"],
            "seconds": reports[n]["seconds"],
            "max_logit_diff_rel": float((logits[n] - logits[1]).abs().max() / logits[1].abs().max()),
        }
        for n in (2, 4)
    ]
    flags = " ".join(FLAGS[name])
    return {
        "command": f"torchrun --standalone --nproc-per-node N -m edkm.cli.main compress {flags} --steps {steps}",
        "reference": f"edkm compress {' '.join(ref_flags)} --steps {steps} (one process)".replace("  ", " "),
        "single_edkm_ppl": ref["edkm_ppl"],
        "single_losses": ref["losses"],
        "single_seconds": ref["seconds"],
        "fsdp": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precisions", nargs="+", default=["fp64", "fp32"], choices=list(FLAGS))
    p.add_argument("--work", default="runs/fsdp_compare")
    p.add_argument("--out", default="benchmarks/results/fsdp_compress.json")
    args = p.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result = {k: v for k, v in result.items() if k in FLAGS}  # one entry per precision, the others kept
    for name in args.precisions:
        result[name] = compare(name, Path(args.work), args.steps)
        result[name]["steps"] = args.steps
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)
        print(
            name,
            json.dumps(
                [{k: v for k, v in r.items() if k != "per_step_rel_loss_diff"} for r in result[name]["fsdp"]], indent=1
            ),
        )


if __name__ == "__main__":
    main()
