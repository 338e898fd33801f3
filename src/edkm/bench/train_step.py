"""One row of ``edkm bench train`` in its own process: ``python -m edkm.bench.train_step SPEC_JSON OUT``.

Builds a LLaMA-architecture model (``transformers.LlamaForCausalLM``, random weights rounded to
bf16 and kept as fp32 master weights, untied head; or a real model given by ``--model``), optionally
palettizes it (eDKM) and turns on activation checkpointing of the decoder layers, then runs whole training
steps: forward, next-token cross-entropy, backward, ``AdamW.step()``, ``zero_grad()``. One warm-up step
(k-means init and optimizer state creation included), then ``steps`` timed steps.

Memory: the process's resident set is read from /proc; ``start`` is taken after the model is
built, before the first step; the peak (``VmHWM``) is reset with ``/proc/self/clear_refs`` before
the warm-up and again before the timed steps, so both peaks are this row's own.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from edkm.atomic import write_json
from edkm.config import PalettizeConfig
from edkm.rss import peak_rss_bytes, reset_peak_rss, rss_bytes
from edkm.transform import palettize_, target_modules


def rss() -> int:
    return rss_bytes() or 0


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    """The spec's real model (``spec["model"]``: a folder, a .gguf file or a known name) in fp32, or a LLaMA of
    the spec's dimensions, fp32 weights holding bf16 values (seeded)."""
    # deferred: transformers is the hf extra, loaded only when the model is built
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.get("model"):
        from edkm.models import load_causal_lm

        return load_causal_lm(spec["model"])[0]

    cfg = LlamaConfig(
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        num_hidden_layers=spec["layers"],
        vocab_size=spec["vocab"],
        max_position_embeddings=max(2048, spec["seq"]),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())
    return model


def recipe_plan(model: torch.nn.Module, spec: dict[str, Any]) -> PalettizeConfig:
    """The row's plan: ``bits``, 8-bit embedding/head per tensor, ``iters``, one LUT per ``group_size`` rows where
    that divides a layer's rows (else per tensor, as ``edkm compare`` does)."""
    rows, embed = spec.get("group_size"), {"embed_tokens|lm_head": {"bits": spec["embed_bits"], "group_size": None}}
    plan = PalettizeConfig(bits=spec["bits"], iters=spec.get("iters", 3), group_size=rows, overrides=embed)
    if rows:
        whole = {n: {"group_size": None} for n, m in target_modules(model, plan) if m.weight.shape[0] % rows}
        plan = replace(plan, overrides={**whole, **embed})
    return plan


def prepare_model(spec: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The spec's model on ``device``: palettized (eDKM) and checkpointed as the spec says, in train mode."""
    model = build_model(spec).to(device)
    if spec["edkm"]:
        plan = recipe_plan(model, spec)
        memory = {
            "": spec["memory"],
            **({"embed_tokens|lm_head": spec["embed_memory"]} if "embed_memory" in spec else {}),
        }
        palettize_(model, plan, memory=memory)
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, sync) -> Any:
    """One whole training step as a function of no arguments; it returns its phases' seconds."""

    def step() -> dict[str, float]:
        t0 = time.perf_counter()
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}

    return step


def memory_counters(cuda: bool) -> tuple[Any, Any, Any]:
    """(reset the peak, current bytes, peak bytes): the CUDA caching allocator's, else the process's RSS."""
    if cuda:  # device memory: the CUDA caching allocator's counters
        return (
            torch.cuda.reset_peak_memory_stats,
            torch.cuda.memory_allocated,
            torch.cuda.max_memory_allocated,
        )
    return reset_peak_rss, rss, peak_rss_bytes  # host memory: the process's resident set


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration; returns its row."""
    torch.set_num_threads(1)
    device = torch.device(spec.get("device", "cpu"))
    model = prepare_model(spec, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"] + 1), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step = training_step(model, opt, tokens, sync)

    cuda = device.type == "cuda"
    reset_peak_now, current, peak_now = memory_counters(cuda)
    gc.collect()
    exact = reset_peak_now() is not False
    start = current()
    first = step()
    first_peak = peak_now() - start
    reset_peak_now()
    times = [step() for _ in range(spec["steps"])]
    steady_peak = peak_now() - start
    median = {k: statistics.median(t[k] for t in times) for k in times[0]}
    row: dict[str, Any] = {
        "start_rss_bytes": start,
        "peak_above_start_bytes": steady_peak,
        "first_step_peak_above_start_bytes": first_peak,
        "peak_reset_exact": exact,
        "step_seconds": median["step"],
        "phase_seconds": median,
        "step_seconds_all": [t["step"] for t in times],
        "first_step_seconds": first["step"],
        "tokens_per_second": spec["batch"] * spec["seq"] / median["step"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "loadavg_1min_end": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "device": str(device),
        "memory_kind": "CUDA allocated bytes" if cuda else "process RSS (VmRSS / VmHWM)",
    }
    if spec.get("profile"):
        row["profile_top_ops"] = profile_step(step)
    return row


def profile_step(step) -> list[dict[str, Any]]:
    """Self CPU time of the top operators over one more training step (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return [{"op": e.key, "self_seconds": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count} for e in events]


def main(argv: list[str]) -> int:
    spec_json, result_path = argv
    row = run_row(json.loads(spec_json))
    write_json(result_path, row, indent=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
