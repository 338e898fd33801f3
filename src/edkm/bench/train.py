"""``edkm bench train``: whole training steps, plain fine-tuning against eDKM, each row in its own process.

Rows (``--rows``): ``plain`` (no clustering), ``edkm-auto`` (3-bit Linears, 8-bit embedding and
head, ``memory="auto"``, profiled), ``edkm-auto+ckpt`` (plus activation checkpointing of the decoder
layers), ``edkm-M+U`` (the paper's marshal+unique on the 3-bit Linears, fused for the 8-bit
embedding/head, whose |W| x 256 maps cannot exist), ``edkm-iters0`` (the real-model recipe: LUTs kept at the
warm start, no centroid update per forward), ``edkm-g16-iters0`` (the same with one LUT per 16 output rows of
the 3-bit Linears, the embedding/head per tensor) and ``coremltools`` (``DKMPalettizer``, measured
on the largest layer that fits, ``--coreml-shape``, the whole model computed from it). Rows that
are not run become computed rows (``"measured": false``) saying why. A step is forward,
cross-entropy, backward, ``AdamW.step()``, ``zero_grad()``; one warm-up step, then the median of
``--steps``. See :mod:`edkm.bench.train_step` for what is measured inside a row.

Example (a small model, a few minutes)::

    edkm bench train --hidden 512 --layers 1 --seq 128 --rows plain,edkm-auto --out runs/bench/small.json
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edkm.bench.configs import GiB
from edkm.bench.coreml import load_coreml_reference
from edkm.bench.measure import child_env, wait_for_memory
from edkm.bench.train_render import format_markdown, write_result

ROWS = ("plain", "edkm-auto", "edkm-auto+ckpt", "edkm-M+U", "edkm-iters0", "edkm-g16-iters0", "coremltools")
DEFAULT_ROWS = "plain,edkm-auto,edkm-auto+ckpt,coremltools"
TARGETS = {"peak": 1.10, "step": 1.5}  # eDKM auto vs plain fine-tuning


def model_dims(args: Any) -> dict[str, int]:
    """The model's dimensions (LLaMA rules for the defaults; a real ``--model``'s own config)."""
    if getattr(args, "model", None):
        from edkm.jobs.size import load_config  # deferred: transformers

        cfg = load_config(args.model)
        return {
            "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            "tied": int(bool(getattr(cfg, "tie_word_embeddings", False))),
            "layers": cfg.num_hidden_layers,
            "vocab": cfg.vocab_size,
            "batch": args.batch,
            "seq": args.seq,
        }
    inter = args.intermediate or 256 * -(-int(8 * args.hidden / 3) // 256)
    return {
        "hidden": args.hidden,
        "intermediate": inter,
        "heads": args.heads or max(1, args.hidden // 128),
        "layers": args.layers,
        "vocab": args.vocab,
        "batch": args.batch,
        "seq": args.seq,
    }


def weight_shapes(d: dict[str, int]) -> list[tuple[str, int, str]]:
    """(name, weights, bits-kind) of every clustered tensor: 'linear' or 'embed' (a tied head is the embedding's).

    >>> d = dict(hidden=576, intermediate=1536, vocab=49152, layers=30, heads=9, kv_heads=3, tied=1)
    >>> sum(n for _, n, _ in weight_shapes(d))  # SmolLM2-135M's 134,515,008 parameters less its 61 norm vectors
    134479872
    """
    h, i, v = d["hidden"], d["intermediate"], d["vocab"]
    kv = h * d.get("kv_heads", d["heads"]) // d["heads"]  # grouped-query attention: k/v project to fewer heads
    per_layer = [("q_proj", h * h), ("k_proj", h * kv), ("v_proj", h * kv), ("o_proj", h * h)]
    per_layer += [(name, h * i) for name in ("gate_proj", "up_proj", "down_proj")]
    embed = [("embed_tokens", v * h, "embed")] + ([] if d.get("tied") else [("lm_head", v * h, "embed")])
    return embed + [(f"layers.{n}.{name}", size, "linear") for n in range(d["layers"]) for name, size in per_layer]


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One row in a fresh interpreter (``python -m edkm.bench.train_step``)."""
    with tempfile.TemporaryDirectory(prefix="edkm_bench_train_") as tmp:
        path = os.path.join(tmp, "row.json")
        env = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, "-m", "edkm.bench.train_step", json.dumps(spec), path],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not os.path.exists(path):
            killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
            raise RuntimeError(f"row failed with exit code {proc.returncode}{killed}: {proc.stderr[-2000:]}")
        with open(path) as f:
            return json.load(f)


def spec_for(row: str, d: dict[str, int], args: Any, device: str) -> dict[str, Any]:
    spec = {
        **d,
        "model": getattr(args, "model", None),
        "bits": args.bits,
        "embed_bits": args.embed_bits,
        "steps": args.steps,
        "device": device,
        "edkm": row != "plain",
        "memory": "auto",
        "checkpointing": row.endswith("+ckpt"),
        "profile": row == "edkm-auto",
    }
    if row == "edkm-M+U":
        spec.update(memory="marshal+unique", embed_memory="fused")
    if row.endswith("iters0"):
        spec.update(iters=0, group_size=16 if "-g16-" in row else None)
    return spec


def coreml_rows(d: dict[str, int], args: Any, plain: dict | None) -> list[dict[str, Any]]:
    """The measured coremltools layer, and the whole model computed from it (``measured: false``)."""
    ref = load_coreml_reference()
    shape = tuple(args.coreml_shape)
    if ref is None:
        return [{"config": "coremltools", "measured": False, "error": "benchmarks/coreml_reference.py not found"}]
    r = ref.measure_coreml(
        shape,
        args.bits,
        batch=d["batch"] * d["seq"],
        dtype="float32",
        kmeans_n_init=1,
        timeout=args.timeout,
        missing_ok=True,
    )
    if not r.get("measured"):
        return [{"config": "coremltools", "measured": False, "error": r.get("error")}]
    units = shape[0] * shape[1] * (1 << args.bits)  # weight x centroid pairs of the measured layer
    layer = {
        "config": f"coremltools one {shape[0]}x{shape[1]} fp32 Linear ({args.bits}-bit)",
        "measured": True,
        "step_seconds": r["seconds"],
        "peak_rss_bytes_layer_process": r["peak_rss_bytes"],
        "saved_bytes": r["footprint_bytes"],
        "peak_rss_bytes": r["peak_rss_bytes"],
        "forward_backward_seconds": r["seconds"],
        "first_step_seconds": r.get("first_step_seconds"),
        "note": f"one forward+backward+palettizer.step of DKMPalettizer on this layer alone in its own process "
        f"(batch = the model's tokens), kmeans_n_init=1 for the first step: saved for backward "
        f"{r['footprint_bytes'] / GiB:.2f} GiB, peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB, "
        f"{r['seconds']:.1f} s; the largest part measured on the shared machine (a 4096 x 4096 projection "
        f"needs ~11 GB at 3 bits, the 8-bit embedding ~{d['vocab'] * d['hidden'] * 256 * 4 * 20 / 1e12:.0f} TB)",
    }
    pairs = sum(n * (1 << (args.embed_bits if kind == "embed" else args.bits)) for _, n, kind in weight_shapes(d))
    saved = r["footprint_bytes"] / units * pairs
    whole = {
        "config": "coremltools DKMPalettizer, whole model",
        "measured": False,
        "peak_above_start_bytes": (plain or {}).get("peak_above_start_bytes", 0) + saved,
        "step_seconds": (plain or {}).get("step_seconds", 0) + r["seconds"] / units * pairs,
        "note": f"computed: plain fine-tuning + the measured layer's saved bytes and seconds per weight x centroid, "
        f"times the model's {pairs:.3g} pairs (8-bit embedding/head: 256 centroids); a lower bound",
    }
    return [layer, whole]


def computed_paper_row(d: dict[str, int], args: Any) -> dict[str, Any]:
    big = max(n for _, n, kind in weight_shapes(d) if kind == "linear")
    emb = d["vocab"] * d["hidden"]
    return {
        "config": "edkm-plain/M/U/S (paper modes) incl. 8-bit embedding",
        "measured": False,
        "note": f"not run: one |W| x |C| fp32 map of the 8-bit embedding is {emb * 256 * 4 / GiB:.0f} GiB, of the "
        f"largest 3-bit Linear {big * 8 * 4 / GiB:.1f} GiB (DKM builds several per update); "
        "`--rows edkm-M+U` runs M+U on the 3-bit Linears only, fused on the embedding/head (not in the "
        "committed run: its transient maps put it over the shared machine's ~10 GiB per-run budget)",
    }


def summarize(rows: list[dict], d: dict[str, int]) -> list[dict[str, Any]]:
    """Ratios to plain fine-tuning and the targets."""
    by = {r["config"]: r for r in rows}
    plain, auto = by.get("plain"), by.get("edkm-auto")
    for r in rows:
        if plain and r.get("peak_above_start_bytes") and r.get("step_seconds"):
            r["peak_vs_plain"] = r["peak_above_start_bytes"] / plain["peak_above_start_bytes"]
            r["step_vs_plain"] = r["step_seconds"] / plain["step_seconds"]
    if not (plain and auto):
        return []
    return [
        {
            "check": "eDKM auto peak memory above start / plain",
            "value": auto["peak_vs_plain"],
            "target": TARGETS["peak"],
            "met": auto["peak_vs_plain"] <= TARGETS["peak"],
        },
        {
            "check": "eDKM auto step time / plain",
            "value": auto["step_vs_plain"],
            "target": TARGETS["step"],
            "met": auto["step_vs_plain"] <= TARGETS["step"],
        },
    ]


def run_rows(wanted: list[str], d: dict[str, int], args: Any, device: str, params: int) -> list[dict[str, Any]]:
    """The wanted rows but coremltools, one after the other, each in its own process (a failed one says why)."""
    rows: list[dict[str, Any]] = []
    for name in wanted:
        if name == "coremltools":
            continue
        print(f"row {name} ...", flush=True)
        wait_for_memory(int(params * 4 * 4.5), print)  # weights, grads, two AdamW states, activations
        t0 = time.time()
        try:
            row = {"config": name, "measured": True, **run_child(spec_for(name, d, args, device), args.timeout)}
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            row = {"config": name, "measured": False, "error": str(err)[-1500:]}
        row["wall_seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(
            f"  {json.dumps({k: row.get(k) for k in ('peak_above_start_bytes', 'step_seconds', 'error')})}", flush=True
        )
    return rows


def result_of(rows: list[dict], d: dict[str, int], args: Any, device: str, params: int, start: float) -> dict[str, Any]:
    """The benchmark's result: the run, the model, the machine, the rows and the targets (``summarize``)."""
    return {
        "command": "edkm bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "edkm bench train",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_seconds": round(time.time() - start),
        "model": {
            **d,
            "clustered_weights": params,
            "arch": f"{args.model} (its own weights, fp32)"
            if getattr(args, "model", None)
            else "transformers LlamaForCausalLM, untied head, fp32 master weights holding bf16 values (random, seeded)",
        },
        "bits": args.bits,
        "embed_bits": args.embed_bits,
        "steps": args.steps,
        "device": device,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "threads_per_process": 1,
            "loadavg_1min_end": os.getloadavg()[0],
        },
        "rows": rows,
        "targets": summarize(rows, d),
        "notes": [
            "Each row ran alone, one after the other, in a fresh process with one thread (OMP/MKL/torch), on a "
            "shared 2-core machine: step times are noisy, compare rows of one run and see loadavg_1min_end.",
            "peak_above_start: the process's peak RSS (VmHWM, reset via /proc/self/clear_refs) minus its RSS after the "
            "model was built, over the timed steps; first_step_peak_above_start: the same over the warm-up step "
            "(k-means init, AdamW state creation).",
            "Measured: every row with measured=true; rows with measured=false are computed and say from what.",
        ],
    }


def run_train_benchmark(args: Any) -> dict[str, Any]:
    """Run the rows, write JSON (+ Markdown, + README section); returns the result."""
    # deferred: edkm.distributed.device imports torch; building the CLI parser imports this module (ROWS)
    from edkm.distributed.device import resolve_device

    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in wanted if r not in ROWS]
    if bad:
        raise ValueError(f"unknown rows {bad}; valid: {', '.join(ROWS)}")
    device, d = str(resolve_device(args.device)), model_dims(args)
    params = sum(n for _, n, _ in weight_shapes(d))
    start = time.time()
    rows = run_rows(wanted, d, args, device, params)
    if "edkm-M+U" not in wanted:
        rows.append(computed_paper_row(d, args))
    if "coremltools" in wanted:
        print("row coremltools ...", flush=True)
        rows += coreml_rows(d, args, next((r for r in rows if r["config"] == "plain" and r.get("measured")), None))
    result = result_of(rows, d, args, device, params, start)
    write_result(result, Path(args.out), Path(args.readme) if args.readme else None)
    print(format_markdown(result))
    return result
