"""The packed result of a run through the user's steps, each timed in its own process (wall s, peak RSS).

    python benchmarks/pipeline.py runs/smollm2-135m [--out benchmarks/results/smollm2_pipeline.json]

Steps: ``from_pretrained`` of the run folder after ``import edkm`` (load only), ``edkm generate`` of the run and of
the original model (greedy, "The capital of France is"), ``edkm export coreml`` (package size, LUT op count, the
bit-exact check of every LUT). One process per step, one after the other; each step's peak RSS is its own
(``os.wait4``). The machine's load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"
BIN = Path(sys.executable).parent


def timed(argv: list[str]) -> dict:
    """Run ``argv``; its wall seconds, peak RSS (its own, from ``wait4``), exit code and output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {
        "command": " ".join(argv),
        "seconds": round(seconds, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "returncode": os.waitstatus_to_exitcode(status),
        "stdout": stdout.strip()[-4000:],
        "stderr_tail": stderr.strip()[-600:] if status else "",
    }


def steps(run: str, original: str, package: str) -> dict[str, list[str]]:
    load = (
        "import time, edkm; from transformers import AutoModelForCausalLM; t = time.perf_counter(); "
        f"m = AutoModelForCausalLM.from_pretrained({run!r}); "
        "print(round(time.perf_counter() - t, 2), sum(b.numel() * b.element_size() for b in m.buffers()))"
    )
    generate = ["generate", "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "24"]
    return {
        "from_pretrained": [sys.executable, "-c", load],
        "generate_packed": [str(BIN / "edkm"), *generate[:1], run, *generate[1:]],
        "generate_original": [str(BIN / "edkm"), *generate[:1], original, *generate[1:]],
        "export_coreml": [str(BIN / "edkm"), "export", "coreml", run, "--out", package],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished edkm compress run folder")
    parser.add_argument("--original", default="smollm2-135m", help="the original model (for generate)")
    parser.add_argument("--out", default="benchmarks/results/smollm2_pipeline.json")
    args = parser.parse_args()
    result = {"run": args.run, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in steps(args.run, args.original, str(Path(tmp) / "model.mlpackage")).items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            result["steps"][name] = step = timed(argv)
            if name == "export_coreml" and step["returncode"] == 0:
                step["report"] = json.loads(step.pop("stdout"))
            print(f"  {step['seconds']} s, peak RSS {step['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    result["loadavg_1min_end"] = os.getloadavg()[0]
    result["threads"] = os.environ.get("OMP_NUM_THREADS", "torch default")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {"seconds": v["seconds"], "rc": v["returncode"]} for k, v in result["steps"].items()}))


if __name__ == "__main__":
    main()
