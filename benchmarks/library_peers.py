"""The peers users would pick instead, through their own libraries, on SmolLM2-135M under the real-model protocol.

    python benchmarks/library_peers.py [--bits 3] [--rows hqq_g64,torchao_int_g128] [--zeroshot] [--resume]

Rows (each library's own quantizer; its integers / LUTs / scales become our LUT layers unchanged, so the file and
its bits per weight are measured like every other row):
- coremltools 9: PostTrainingPalettizer (k-means) and SKMPalettizer (sensitive k-means, Fisher from the next-token
  loss), per tensor and per 16 output channels (``edkm.peers.coreml_palettizers``);
- hqq: HQQ's half-quadratic zero-point / scale optimisation, calibration-free, g64 and g128 (``edkm.peers.hqq``);
- GPTQModel 7.6.0 (its own venv, ``bash scripts/setup.sh --gptqmodel``; ``benchmarks/gptqmodel_quantize.py``): GPTQ
  g128 and per channel, AWQ g128 (4 bits: its GEMM format holds no other width), on the same 32 calibration
  sequences; its saved folder is read by ``edkm.peers.gptqmodel_format`` (levels bit for bit the library's), and
  the row's bits per weight are those of the library's saved tensors (``library_bits``; the group index GPTQ
  stores per input column included);
- torchao 0.18: ``IntxWeightOnlyConfig`` post-training (symmetric round-to-nearest, g128) and QAT
  (``QATConfig(IntxWeightOnlyConfig)``, fake-quantized g128 linears fine-tuned with the eDKM job's data, steps,
  batch, schedule and teacher: ``--qat-lr``, ``--seed``; ``edkm.peers.qat``).
The 8-bit embedding/head: coremltools' k-means per tensor in the coremltools rows, round-to-nearest per channel
in the others (HQQ and torchao leave embeddings to the user).

The protocol of ``bash scripts/run.sh --model smollm2-135m``: calibration on the 32 training sequences every
post-training peer of ``edkm compress`` uses, training on the instruction records' training split, knobs chosen on
validation (the first 8,192 tokens of the records' validation split, recorded per row as ``val_ppl``), WikiText-2
test (first 16,384 tokens, 2048-token windows) reported; ``--zeroshot``: the five zero-shot tasks, first 100 items
each (``src/edkm/assets/eval/field500``). A row already in ``--out`` is kept with ``--resume`` (rebuilt if
``--zeroshot`` asks for scores it lacks). One process, the torch threads of the environment (recorded).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

import edkm
from edkm.bench.zeroshot import FIELD_TASKS, average
from edkm.config import EMBEDDING_LAYERS
from edkm.data.text import load_text, tokenize_text
from edkm.eval import perplexity
from edkm.eval.zeroshot import evaluate_tasks
from edkm.jobs.compress import CompressConfig, split_data
from edkm.models import load_causal_lm
from edkm.peers.coreml_palettizers import coreml_kmeans_, coreml_skm_
from edkm.peers.fast import calibration
from edkm.peers.gptqmodel_format import load_gptqmodel_, saved_bits
from edkm.peers.hqq import hqq_
from edkm.peers.measure import bits_per_weight
from edkm.peers.qat import convert_qat_, intx_ptq_, prepare_qat_, qat_to_lut_
from edkm.training.finetune import finetune
from edkm.training.loop import TrainConfig

ASSETS = Path(edkm.__file__).parent / "assets"
HERE = Path(__file__).resolve().parent
GPTQMODEL_PYTHON = HERE.parent / ".venv-gptqmodel" / "bin" / "python"
VALIDATION_TOKENS = 8192
Build = Callable[[Any, dict[str, Any], Any], Any]  # (model copy, context, plan) -> quantized model


def _qat(model: Any, ctx: dict[str, Any], plan: Any) -> Any:
    """torchao QAT g128: the eDKM job's training budget and teacher (the original model), then torchao's convert."""
    args = ctx["args"]
    train = TrainConfig(steps=args.steps, batch_size=4, lr=args.qat_lr, seed=args.seed, checkpoint_every=0)
    prepare_qat_(model, plan, 128)
    with tempfile.TemporaryDirectory() as tmp:
        finetune(model, ctx["train"], train, Path(tmp) / "ckpt", False, teacher=ctx["teacher"], distill=1.0)
    return qat_to_lut_(convert_qat_(model.eval()))


class Unavailable(Exception):
    """A row its library cannot produce here; the message (one line) is recorded as the row's reason."""


def _gptqmodel(method: str, group_size: int) -> Build:
    """A GPTQModel row: the library quantizes a saved copy of the model in its venv, we read its folder back."""

    def build(model: Any, ctx: dict[str, Any], plan: Any) -> Any:
        if not GPTQMODEL_PYTHON.is_file():
            raise Unavailable(f"{GPTQMODEL_PYTHON} is missing: run bash scripts/setup.sh --gptqmodel")
        if method == "awq" and plan.bits != 4:
            raise Unavailable("GPTQModel 7.6.0's AWQ saves only its 4-bit GEMM format")
        with tempfile.TemporaryDirectory() as tmp:
            fp, calib, out = Path(tmp) / "fp", Path(tmp) / "calib.json", Path(tmp) / "quantized"
            model.save_pretrained(fp)
            ctx["tokenizer"].save_pretrained(fp)
            calib.write_text(json.dumps(ctx["calib"].tolist()))
            command = [str(GPTQMODEL_PYTHON), str(HERE / "gptqmodel_quantize.py"), "--model", str(fp), "--calib"]
            command += [str(calib), "--out", str(out), "--method", method, "--bits", str(plan.bits)]
            subprocess.run([*command, "--group-size", str(group_size)], check=True, cwd=tmp)
            run = json.loads((out / "edkm_quantize.json").read_text())  # its version, settings and seconds
            ctx["extra"] = {"library_bits": saved_bits(out), **{k: run[k] for k in ("library", "dtype", "seconds")}}
            return load_gptqmodel_(model, out, plan)

    return build


ROWS: dict[str, tuple[str, str, Build]] = {  # name -> (label, library, build)
    "coreml_kmeans": (
        "coremltools PostTrainingPalettizer per tensor",
        "coremltools",
        lambda m, c, p: coreml_kmeans_(m, p),
    ),
    "coreml_kmeans_g16": (
        "coremltools PostTrainingPalettizer per 16 rows",
        "coremltools",
        lambda m, c, p: coreml_kmeans_(m, p, 16),
    ),
    "coreml_skm": (
        "coremltools SKMPalettizer per tensor",
        "coremltools",
        lambda m, c, p: coreml_skm_(m, c["calib"], p),
    ),
    "coreml_skm_g16": (
        "coremltools SKMPalettizer per 16 rows",
        "coremltools",
        lambda m, c, p: coreml_skm_(m, c["calib"], p, 16),
    ),
    "hqq_g64": ("HQQ g64", "hqq", lambda m, c, p: hqq_(m, p, 64)),
    "hqq_g128": ("HQQ g128", "hqq", lambda m, c, p: hqq_(m, p, 128)),
    "torchao_int_g128": (
        "torchao IntxWeightOnlyConfig g128 (post-training)",
        "torchao",
        lambda m, c, p: intx_ptq_(m, p, 128),
    ),
    "torchao_qat_g128": ("torchao QAT g128, fine-tuned", "torchao", _qat),
    "gptqmodel_gptq_g128": ("GPTQModel GPTQ g128", "gptqmodel", _gptqmodel("gptq", 128)),
    "gptqmodel_gptq_pc": ("GPTQModel GPTQ per channel", "gptqmodel", _gptqmodel("gptq", -1)),
    "gptqmodel_awq_g128": ("GPTQModel AWQ g128", "gptqmodel", _gptqmodel("awq", 128)),
}


def library_version(library: str) -> str:
    """``name version`` of a row's library (GPTQModel's is in its own venv: the version its run recorded)."""
    return library if library == "gptqmodel" else f"{library} {version(library)}"


def row_key(name: str, args: argparse.Namespace) -> str:
    """A trained row's key names its knobs (each lr and seed its own row); a post-training row is its name."""
    return f"{name}_lr{args.qat_lr:g}_s{args.seed}" if name == "torchao_qat_g128" else name


def measure(peer: Any, name: str, ctx: dict[str, Any], zeroshot: bool) -> dict[str, Any]:
    """Bits per weight of the saved file, validation and WikiText-2 perplexity, and zero-shot scores if asked."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.edkm.safetensors"
        edkm.save_palettized(peer, path)
        out: dict[str, Any] = {"bits_per_weight": bits_per_weight(path), "file_bytes": path.stat().st_size}
    out["val_ppl"] = perplexity(peer, ctx["validation"], context=2048)
    out["ppl"] = perplexity(peer, ctx["test"], context=2048)
    if zeroshot:
        data_dir = str(ASSETS / "eval" / "field500")
        scores = evaluate_tasks(peer.eval(), ctx["tokenizer"], FIELD_TASKS, data_dir=data_dir, limit=100)
        out["zeroshot"] = {"tasks": scores, "average": average(scores), "limit": 100}
    return out


def context(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The original model and what every row shares: calibration, training data, validation and test tokens."""
    model, tokenizer = load_causal_lm("smollm2-135m")
    cfg = CompressConfig(model="smollm2-135m", alpaca=str(ASSETS / "instruction" / "instruction-data.json"))
    train, validation, _test = split_data(cfg, tokenizer)
    test = tokenize_text(tokenizer, load_text(str(ASSETS / "wikitext2" / "wiki.test.raw")))[:16384]
    ctx = {"calib": calibration(train), "train": train, "validation": validation[: VALIDATION_TOKENS + 1]}
    return model, {**ctx, "test": test, "tokenizer": tokenizer, "teacher": model, "args": args}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/smollm2_library_peers_<bits>bit.json")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--zeroshot", action="store_true", help="also score the zero-shot tasks (first 100 each)")
    parser.add_argument("--qat-lr", type=float, default=1e-4, help="peak lr of the QAT row (choose on val_ppl)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the QAT row (eDKM's: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the QAT row's batch order")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    args = parser.parse_args()
    unknown = sorted(set(r for r in args.rows.split(",") if r) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    out = Path(args.out or f"benchmarks/results/smollm2_library_peers_{args.bits}bit.json")
    result = json.loads(out.read_text()) if args.resume and out.is_file() else {"rows": {}}
    model, ctx = context(args)
    plan = edkm.PalettizeConfig(bits=args.bits, overrides={EMBEDDING_LAYERS: {"bits": 8}})
    result.update(
        protocol="calibration: 32 training sequences of 257 tokens (edkm.peers.fast.calibration); validation: the "
        "instruction records' validation split, first 8,192 tokens; WikiText-2 test, first 16,384 tokens; "
        "2048-token windows",
        bits=args.bits,
        threads=torch.get_num_threads(),
    )
    for name in [r for r in args.rows.split(",") if r]:
        key, (label, library, build) = row_key(name, args), ROWS[name]
        done = result["rows"].get(key, {})
        if done and "val_ppl" in done and (not args.zeroshot or "zeroshot" in done):
            continue
        start = time.perf_counter()
        try:
            peer = build(copy.deepcopy(model), ctx, plan)
        except Unavailable as reason:
            result["unavailable"] = {**result.get("unavailable", {}), key: {"label": label, "reason": str(reason)}}
            out.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{label}: not run: {reason}", flush=True)
            continue
        built = time.perf_counter() - start
        row = {"label": label, "library": library_version(library), "build_seconds": round(built, 1)}
        if name == "torchao_qat_g128":
            row.update(lr=args.qat_lr, seed=args.seed, steps=args.steps)
        row.update(ctx.pop("extra", {}))  # what a GPTQModel run recorded
        result["rows"][key] = {**row, **measure(peer, name, ctx, args.zeroshot)}
        result.get("unavailable", {}).pop(key, None)  # a row not run before (e.g. a missing venv) that runs now
        if "library_bits" in row:  # the library's file, not our re-save (which repeats a group's LUT per range)
            bpw = result["rows"][key]["bits_per_weight"]
            row_bits = bpw[str(args.bits)]
            bpw.update({str(args.bits): row["library_bits"]["bits_per_weight"], "edkm_file": row_bits})
        result["loadavg_1min"] = os.getloadavg()[0]
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every row: a stopped run resumes
        bpw = result["rows"][key]["bits_per_weight"][str(args.bits)]
        print(f"{label}: ppl {result['rows'][key]['ppl']:.2f}, {bpw:.3f} b/w, {built:.0f} s", flush=True)


if __name__ == "__main__":
    main()
