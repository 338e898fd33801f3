"""``edkm bench generate``: batch-1 generation from dense and packed models, each in its own process.

Models: ``llama150m`` (LLaMA-style, hidden 1024, 8 layers, intermediate 2816, 16 heads, vocab 32000,
untied head: 168 M parameters; random weights, seed 0), ``stories260k`` (the bundled model) and ``smollm2``
(SmolLM2-135M-Instruct, the real LLM: its shipped Q4_1 GGUF dequantized to fp32; tied 49,152 x 576 head). Each
is saved dense (Hugging Face folder, fp32) and packed by our own code (``edkm.ptq_kmeans_``, i.e.
``palettize_`` + ``finalize_`` with zero training steps, then ``save_palettized``; one LUT per tensor).

Configurations (:data:`CONFIGS`): dense fp32, dense bf16, packed 3 and 4 bits (every Linear and the
embedding), packed 3 bits with an 8-bit embedding/head (``edkm compress``'s default), packed 3 bits
with kernel ``eager`` (the exact tiled kernel: no native or compiled GEMV) and packed 3 bits with the
approximate int8 kernel. Every configuration runs in a fresh interpreter with one thread
(:mod:`.generate_child`); the models are prepared once in another one.

Targets (:func:`targets`): packed decode >= 0.8x the dense fp32 tokens/s; resident weights <= 1/4 of
fp32; load peak <= packed file size + the largest weight in fp32 (activations: none while loading).
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

from edkm.atomic import write_text
from edkm.bench.measure import child_env

MiB = 1 << 20
# name -> (kind, dtype or bits, embedding/head bits or None, kernel or None, extra environment)
CONFIGS: dict[str, tuple[str, Any, int | None, str | None, dict[str, str]]] = {
    "fp32": ("dense", "float32", None, None, {}),
    "bf16": ("dense", "bfloat16", None, None, {}),
    "packed3": ("packed", 3, None, None, {}),
    "packed4": ("packed", 4, None, None, {}),
    "packed3-e8": ("packed", 3, 8, None, {}),
    "packed3-eager": ("packed", 3, None, "eager", {}),
    "packed3-int8": ("packed", 3, None, "int8", {}),
}
MODELS = ("llama150m", "stories260k", "smollm2")  # smollm2: SmolLM2-135M-Instruct (bash scripts/setup.sh --smollm2)
LLAMA150M = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def subset(text: str, allowed: Any, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return names


def run_child(args: list[str], env_extra: dict[str, str], timeout: float) -> dict:
    """``python -m edkm.bench.generate_child *args RESULT`` in a fresh interpreter; its JSON result."""
    with tempfile.TemporaryDirectory(prefix="edkm_generate_") as tmp:
        path = os.path.join(tmp, "result.json")
        env = child_env(**env_extra)
        proc = subprocess.run(
            [sys.executable, "-m", "edkm.bench.generate_child", *args, path],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"measurement process failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
        return json.loads(Path(path).read_text())


def packed_name(bits: int, embed_bits: int | None) -> str:
    return f"packed{bits}" + (f"-e{embed_bits}" if embed_bits else "") + ".safetensors"


def run_generate_benchmark(args: Any) -> dict:
    """Prepare the models, measure every (model, configuration), write JSON/Markdown (and the README section)."""
    models = subset(args.models, MODELS, "model")
    configs = subset(args.configs, CONFIGS, "configuration")
    work = Path(args.work_dir)
    t0, out_models = time.time(), {}
    for model in models:
        variants = sorted({(CONFIGS[c][1], CONFIGS[c][2]) for c in configs if CONFIGS[c][0] == "packed"}, key=str)
        spec = {"model": model, "dir": str(work / model), "packed": [[b, e, packed_name(b, e)] for b, e in variants]}
        print(f"[{model}] preparing models in {work / model} ...", file=sys.stderr, flush=True)
        info = run_child(["prepare", json.dumps(spec)], {"OMP_NUM_THREADS": "2"}, args.timeout)
        rows = []
        for config in configs:
            kind, what, embed_bits, kernel, env = CONFIGS[config]
            path = info["dense_dir"] if kind == "dense" else str(work / model / packed_name(what, embed_bits))
            child = {
                "kind": kind,
                "path": path,
                "dtype": what if kind == "dense" else None,
                "kernel": kernel,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "threads": args.threads,
                "seed": 0,
            }
            print(f"[{model}] {config} ...", file=sys.stderr, flush=True)
            try:
                row = run_child(
                    ["measure", json.dumps(child)], {**env, "OMP_NUM_THREADS": str(args.threads)}, args.timeout
                )
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                row = {"error": str(err)[-1000:]}
            row.update(
                config=config, file_bytes=info["file_bytes"].get(Path(path).name if kind == "packed" else "dense")
            )
            rows.append(row)
            print(f"  {summary_line(row)}", file=sys.stderr, flush=True)
        out_models[model] = {**{k: v for k, v in info.items() if k != "dense_dir"}, "results": rows}
        if model == "llama150m" and args.profile:
            print("[llama150m] kernel profile ...", file=sys.stderr, flush=True)
            shapes = [[2816, 1024], [1024, 2816], [1024, 1024], [32000, 1024]]
            spec = {"shapes": shapes, "bits": [3, 4, 8], "repeats": 5, "threads": args.threads}
            out_models[model]["kernel_profile"] = run_child(
                ["profile", json.dumps(spec)], {"OMP_NUM_THREADS": str(args.threads)}, args.timeout
            )
    result = {
        "models": out_models,
        "targets": {m: targets(v) for m, v in out_models.items()},
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["edkm", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "wall_seconds": time.time() - t0,
    }
    write_outputs(result, args)
    return result


def summary_line(row: dict) -> str:
    if "error" in row:
        return f"{row['config']}: ERROR {row['error'][-300:]}"
    return (
        f"{row['config']}: {row['decode_tokens_per_second']:.2f} tok/s, TTFT {row['ttft_seconds']:.2f} s, "
        f"weights {row['weight_bytes'] / MiB:.1f} MiB, load {row['load_seconds']:.2f} s "
        f"(peak +{row['load_peak_rss_bytes'] / MiB:.0f} MiB), load avg {row['loadavg_1min']:.1f}"
    )


def targets(model: dict) -> dict[str, dict]:
    """The issue's targets per packed configuration, from the rows alone."""
    rows = {r["config"]: r for r in model["results"] if "error" not in r}
    fp32, out = rows.get("fp32"), {}
    for name, r in rows.items():
        if not name.startswith("packed") or fp32 is None:
            continue
        speed = r["decode_tokens_per_second"] / fp32["decode_tokens_per_second"]
        weights = r["weight_bytes"] / fp32["weight_bytes"]
        allowed = r["file_bytes"] + model["largest_weight_fp32_bytes"]
        out[name] = {
            "decode vs fp32 >= 0.8": {"value": speed, "met": speed >= 0.8},
            "weights vs fp32 <= 0.25": {"value": weights, "met": weights <= 0.25},
            "load peak <= file + largest weight fp32": {
                "value": r["load_peak_rss_bytes"],
                "limit": allowed,
                "met": r["load_peak_rss_bytes"] <= allowed,
            },
        }
    return out


def format_markdown(result: dict) -> str:
    lines = []
    for model, data in result["models"].items():
        rows = {r["config"]: r for r in data["results"]}
        fp32 = rows.get("fp32", {})
        lines += [
            f"**{model}** ({data['params'] / 1e6:.1f} M parameters)",
            "",
            "| config | file MiB | weights MiB | vs fp32 | load s | load peak MiB | peak MiB | warm-up s "
            "| TTFT s | decode tok/s | vs fp32 | logits err | load avg |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error'][-120:]!r} |")
                continue
            ratio = lambda k, r=r, fp32=fp32: f"{r[k] / fp32[k]:.2f}x" if fp32.get(k) else "-"  # noqa: E731
            err = r.get("logits_rel_error_gemv")
            err_s = "-" if err is None else f"{max(err, r['logits_rel_error_prefill']):.1e}"
            lines.append(
                f"| {name} | {(r['file_bytes'] or 0) / MiB:,.1f} | {r['weight_bytes'] / MiB:,.1f} | "
                f"{ratio('weight_bytes')} | "
                f"{r['load_seconds']:.2f} | {r['load_peak_rss_bytes'] / MiB:,.0f} | "
                f"{r.get('peak_rss_bytes', 0) / MiB:,.0f} | "
                f"{r['warmup_seconds']:.1f} | "
                f"{r['ttft_seconds']:.2f} | {r['decode_tokens_per_second']:.2f} | "
                f"{ratio('decode_tokens_per_second')} | "
                f"{err_s} | {r['loadavg_1min']:.1f} |"
            )
        lines.append("")
        profile = data.get("kernel_profile")
        if profile:
            bits = [k for k in profile["rows"][0] if k.endswith("bit")]
            lines += [
                "Kernel profile, batch 1, ms per Linear (dense fp32 vs packed, interleaved; "
                f"load {profile['loadavg_1min']:.1f}):",
                "",
                "| shape | dense fp32 | " + " | ".join(f"packed {b}" for b in bits) + " |",
                "| --- | ---: | " + " | ".join("---:" for _ in bits) + " |",
            ]
            for r in profile["rows"]:
                dense = min(r[b]["dense_ms"] for b in bits)
                cells = " | ".join(f"{r[b]['packed_ms']:.2f} ({r[b]['packed_ns_per_weight']:.2f} ns/w)" for b in bits)
                lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {dense:.2f} | {cells} |")
            lines.append("")
        for config, checks in result["targets"].get(model, {}).items():
            marks = ", ".join(
                f"{k}: {'met' if v['met'] else 'MISSED'} ({v['value'] / MiB:,.1f} MiB <= {v['limit'] / MiB:,.1f})"
                if "limit" in v
                else f"{k}: {'met' if v['met'] else 'MISSED'} ({v['value']:.4f})"
                for k, v in checks.items()
            )
            lines.append(f"- {config}: {marks}")
        lines.append("")
    lines.append(
        f"{result['threads']} thread per process, each configuration in its own process; "
        f"{result['prompt_tokens']}-token "
        f"prompt, {result['new_tokens']} greedy tokens; `{result['command']}` on {result['date']}."
    )
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, args: Any) -> None:
    """JSON to ``--out``, Markdown beside it (or ``--md``), and the README section if ``--readme``."""
    out = Path(args.out)
    write_text(out, json.dumps(result, indent=1) + "\n")
    md = format_markdown(result)
    write_text(Path(args.md) if args.md else out.with_suffix(".md"), md)
    if args.readme:
        readme = Path(args.readme)
        text = readme.read_text()
        start, end = "<!-- generate table -->\n", "<!-- /generate table -->"
        if start not in text or end not in text:
            raise ValueError(f"{readme} has no '<!-- generate table -->' ... '<!-- /generate table -->' section")
        head, rest = text.split(start, 1)
        write_text(readme, head + start + md + rest[rest.index(end) :])
    print(f"wrote {out}" + (f" and {args.readme}" if args.readme else ""), file=sys.stderr)
