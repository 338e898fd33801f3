"""Side-by-side wall and CPU time of `edkm compress --steps N --quiet` with 2 threads (torch's old
default on 2 cores) and with the new default rule (1 thread for the bundled model), alternating.

    python scripts/bench_threads.py --reps 1 --steps 20 --out runs/bench/threads.json

Each row records the 1-minute load average before and after: on a shared machine only rows taken
side by side compare. The committed `benchmarks/results/threads.json` came from this procedure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(steps: int, threads: list[str], out_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    l0, r0, t0 = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    cmd = [sys.executable, "-m", "edkm", "compress", "--steps", str(steps), "--out", str(out_dir), "--quiet", *threads]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "command": " ".join(cmd[2:]),
        "returncode": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 1),
        "load_before": round(l0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=1, help="alternating pairs")
    parser.add_argument("--steps", type=int, default=20, help="steps of each compress run")
    parser.add_argument("--out", default="runs/bench/threads.json", help="JSON output")
    args = parser.parse_args()
    rows = []
    for rep in range(args.reps):
        for name, flags in (("2 threads (old default)", ["--threads", "2"]), ("default rule (1 thread)", [])):
            rows.append(
                {"rep": rep, "setting": name, **measure(args.steps, flags, Path(args.out).parent / "threads-run")}
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"cores": os.cpu_count(), "rows": rows}
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
