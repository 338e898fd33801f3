"""Quantize an HF model folder with GPTQModel (GPTQ or AWQ) on CPU; runs in the gptqmodel venv, not edkm's.

    .venv-gptqmodel/bin/python benchmarks/gptqmodel_quantize.py --model FP_DIR --calib calib.json --out OUT_DIR \
        [--method gptq|awq] [--bits 3] [--group-size 128|-1] [--dtype auto]

``calib.json`` is a list of token-id lists (edkm's calibration sequences, written by ``library_peers.py``), fed
unchanged (attention mask all ones, batch 1). GPTQ: symmetric, ``desc_act=False`` (groups of consecutive input
columns, which our LUT layers hold; its group-aware reordering, on by default, is off per channel, where it
refuses to run), the library's other defaults; AWQ: asymmetric GEMM format (4 bits).
GPTQModel 7.6.0 pins numpy 2.2.6 and torch < 2.14, hence its own venv (``bash scripts/setup.sh --gptqmodel``).
Besides the library's folder, ``OUT_DIR/edkm_quantize.json`` records the settings, library version and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib.metadata import version
from pathlib import Path

# 7.6.0 on a 2-core box: its default of 1 CPU worker is below the model loader's 2 and raises ValueError
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# its CPU kernels torch.compile() their dequantization on load: minutes on a busy 2-core box, no use here
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the CPU protocol, as every other peer row
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def quantize(
    model_dir: str, calib: list[list[int]], out: str, method: str, bits: int, group_size: int, dtype: str
) -> object:
    """Run GPTQModel's quantizer on ``model_dir`` with ``calib`` and save its folder to ``out``; returns the model."""
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    if method == "gptq":  # the library's group-aware reordering (its default) refuses per channel: off there
        kind = {"sym": True, "desc_act": False, "act_group_aware": group_size > 0}
    else:
        kind = {"sym": False, "method": METHOD.AWQ, "format": FORMAT.GEMM}
    qc = QuantizeConfig(bits=bits, group_size=group_size, device="cpu", offload_to_disk=False, **kind)
    load = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = GPTQModel.load(model_dir, qc, **load)
    data = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calib]
    model.quantize(data, batch_size=1, backend=BACKEND.TORCH)
    model.save(out)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="fp HF model folder (with its tokenizer)")
    parser.add_argument("--calib", required=True, help="JSON list of token-id lists")
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", choices=("gptq", "awq"), default="gptq")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128, help="-1: per output channel")
    parser.add_argument("--dtype", default="auto", help="auto (the library's CPU choice: bfloat16) or a torch dtype")
    args = parser.parse_args()
    calib = json.loads(Path(args.calib).read_text())
    start = time.perf_counter()
    quantize(args.model, calib, args.out, args.method, args.bits, args.group_size, args.dtype)
    seconds = time.perf_counter() - start
    record = {k: getattr(args, k) for k in ("method", "bits", "group_size", "dtype")}
    record.update(library=f"gptqmodel {version('gptqmodel')}", seconds=round(seconds, 1), sequences=len(calib))
    (Path(args.out) / "edkm_quantize.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
