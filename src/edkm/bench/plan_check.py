"""Validate `edkm plan` against measured training steps on this machine (one process, one thread).

    edkm bench plan-check --out benchmarks/results/plan_validation.json

For small LLaMA-style configs, each (config, mode) runs in a fresh process: build the model from its
config (random weights, fp32), palettize it (except "plain-ft"), and run two whole training steps
(forward, cross-entropy, backward, AdamW step); the measured figure is the peak RSS above the RSS
before the model was built, after one step of a tiny model has initialised the libraries, with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the system (RSS then follows the
live tensors rather than glibc's heap high-water mark). The estimate is :func:`edkm.jobs.plan.estimate`
for one GPU, fp32 compute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from edkm.atomic import write_json
from edkm.config import PalettizeConfig
from edkm.jobs.plan import PlanOptions, estimate
from edkm.rss import peak_rss_bytes, rss_bytes
from edkm.transform import palettize_

CONFIGS = {
    "llama-h256-l4": dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=2048
    ),
    "llama-h512-l2": dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8, vocab_size=4096
    ),
    "llama-h128-l2": dict(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, vocab_size=512
    ),
}
CASES = [
    ("llama-h256-l4", "plain-ft", 4, 256),
    ("llama-h256-l4", "fused", 4, 256),
    ("llama-h512-l2", "plain-ft", 2, 256),
    ("llama-h512-l2", "fused", 2, 256),
    ("llama-h128-l2", "coremltools", 2, 64),
    ("llama-h128-l2", "fused", 2, 64),
]
BITS = 3


def _config(name: str):
    # deferred: transformers is the hf extra, loaded only when a model is built
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIGS[name], tie_word_embeddings=False)


def _warm_up() -> None:
    """One training step of a tiny model: one-time library initialisation stays out of the measurement."""
    # deferred: transformers is the hf extra, loaded only when a model is built
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )
    palettize_(tiny, PalettizeConfig(bits=2))
    opt = torch.optim.AdamW(tiny.parameters())
    tiny(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)).loss.backward()
    opt.step()


def measure(name: str, mode: str, batch: int, seq: int) -> int:
    """Peak RSS bytes above the start of two training steps (run in this process)."""
    # deferred: transformers is the hf extra, loaded only when a model is built
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    _warm_up()
    config = _config(name)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    start = rss_bytes() or 0
    model = AutoModelForCausalLM.from_config(config)
    if mode != "plain-ft":
        palettize_(model, PalettizeConfig(bits=BITS), memory={"coremltools": "plain"}.get(mode, mode))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        logits = model(ids[:, :-1]).logits.float()
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return peak_rss_bytes() - start


def run(out: str = "benchmarks/results/plan_validation.json") -> list[dict]:
    """Measure every case in its own process, compare with the estimate, write ``out``; returns the rows."""
    rows = []
    for name, mode, batch, seq in CASES:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        res = subprocess.run(
            [sys.executable, "-m", "edkm.bench.plan_check", name, mode, str(batch), str(seq)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        if res.returncode:
            raise RuntimeError(f"measurement {name} {mode} failed: {res.stderr[-2000:]}")
        measured = json.loads(res.stdout.strip().splitlines()[-1])["peak"]
        opts = PlanOptions(bits=BITS, embed_bits=0, gpus=1, batch=batch, seq=seq, mixed_precision=False)
        est = next(r for r in estimate(_config(name), opts)["modes"] if r["mode"] == mode)["peak_gib"] * 2**30
        rows.append(
            {
                "config": name,
                **CONFIGS[name],
                "mode": mode,
                "batch": batch,
                "seq": seq,
                "measured_bytes": measured,
                "estimated_bytes": int(est),
                "error": est / measured - 1,
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
        )
        print(json.dumps(rows[-1]))
    write_json(out, {"bits": BITS, "threads": 1, "rows": rows})
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| config | mode | batch x seq | measured peak (MiB) | estimate (MiB) | error |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['config']} | {r['mode']} | {r['batch']} x {r['seq']} | {r['measured_bytes'] / 2**20:.0f} | "
        f"{r['estimated_bytes'] / 2**20:.0f} | {r['error']:+.1%} |"
        for r in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # a measurement process of run(): NAME MODE BATCH SEQ
    name, mode, batch, seq = sys.argv[1:5]
    print(json.dumps({"peak": measure(name, mode, int(batch), int(seq))}))
