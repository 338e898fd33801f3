"""`edkm compress --fsdp` on 2 and 4 gloo processes against one process, same global batch (bundled model).

    python scripts/fsdp_compare.py --steps 20 --out benchmarks/results/fsdp_compress.json

Runs the three jobs (defaults of `edkm compress` otherwise) and records, per process count, the
largest relative per-step loss difference and the largest logit difference of the packed models
(relative to the largest logit), on 4 x 64 random tokens.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import edkm


def run(procs: int, out: Path, steps: int) -> dict:
    launch = [sys.executable, "-m", "edkm.cli"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m", "edkm.cli"]
    extra = [] if procs == 1 else ["--fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*launch, "compress", "--steps", str(steps), "--quiet", "--out", str(out), *extra], check=True, env=env)
    return json.loads((out / "report.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--work", default="runs/fsdp_compare")
    p.add_argument("--out", default="benchmarks/results/fsdp_compress.json")
    args = p.parse_args()
    work = Path(args.work)
    reports = {n: run(n, work / f"p{n}", args.steps) for n in (1, 2, 4)}
    x = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {n: edkm.load_palettized(work / f"p{n}" / "model.edkm.safetensors")(x).logits for n in reports}
    ref = reports[1]
    rows = []
    for n in (2, 4):
        rel = max(abs(a - b) / abs(b) for a, b in zip(reports[n]["losses"], ref["losses"]))
        rows.append({"processes": n, "max_rel_loss_diff": rel, "edkm_ppl": reports[n]["edkm_ppl"],
                     "max_logit_diff_rel": float((logits[n] - logits[1]).abs().max() / logits[1].abs().max())})
    result = {"steps": args.steps, "single_edkm_ppl": ref["edkm_ppl"], "single_losses": ref["losses"], "fsdp": rows,
              "command": "torchrun --standalone --nproc-per-node N -m edkm.cli compress --fsdp --steps "
                         f"{args.steps} (vs edkm compress --steps {args.steps})"}
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
