"""Sizes of the Core ML export next to our packed file and fp16, with the bit-exact verification.

    python benchmarks/coreml_export_sizes.py [--model runs/x/model.edkm.safetensors] [--out benchmarks/results/coreml_export.json]

Without ``--model`` the bundled stories260K is palettized post-training with the ``edkm compress`` plan
(3-bit, embeddings and head 8-bit; the sizes depend only on the plan, not on training). For each of
iOS 18, iOS 18 with ``--kv-cache`` and iOS 16 it exports, reads the package back and checks the LUT ops;
the fp16 row is the same model converted by coremltools without compression metadata.
"""  # noqa: E501 -- --help prints this docstring verbatim (RawDescriptionHelpFormatter): the usage line stays whole

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import warnings
from pathlib import Path

import torch

import edkm
from edkm.config import EMBEDDING_LAYERS
from edkm.coreml.convert import export_coreml, import_coremltools, write_package
from edkm.coreml.trace import StatelessLM, causal_mask
from edkm.coreml.verify import WEIGHTS_DIR, fp16_bytes, package_bytes, verify_mlpackage
from edkm.models import load_causal_lm


def fp16_package(model: torch.nn.Module, path: Path, length: int) -> int:
    ct = import_coremltools()
    ids = torch.zeros(1, length, dtype=torch.int32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(StatelessLM(model).eval(), (ids, causal_mask(length, length)), check_trace=False)
    types = ct.converters.mil.mil.types
    ml = ct.convert(
        traced,
        inputs=[
            ct.TensorType("input_ids", shape=(1, length), dtype=types.int32),
            ct.TensorType("mask", shape=(1, 1, length, length), dtype=types.fp16),
        ],
        minimum_deployment_target=ct.target.iOS18,
        convert_to="mlprogram",
        skip_model_load=True,
    )
    write_package(ml, path)
    return package_bytes(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="packed edkm file (default: the bundled model, k-means 3/8-bit)")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/coreml_export.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def measure(args: argparse.Namespace, work: Path) -> dict:
    if args.model:
        packed = Path(args.model)
        model = edkm.load_palettized(packed).eval()
        fp_model = None
    else:
        fp_model, _ = load_causal_lm(None)
        model = edkm.ptq_kmeans_(
            copy.deepcopy(fp_model), edkm.PalettizeConfig(bits=3, overrides={EMBEDDING_LAYERS: {"bits": 8}})
        )
        packed = work / "model.edkm.safetensors"
        edkm.save_palettized(model, packed)
    rows = {}
    for name, target, kv in (("ios18", "ios18", False), ("ios18 --kv-cache", "ios18", True), ("ios16", "ios16", False)):
        out = export_coreml(
            model, work / f"{target}{'-kv' if kv else ''}.mlpackage", target=target, kv_cache=kv, length=args.length
        )
        report = verify_mlpackage(out, model, target)
        rows[name] = {
            k: report[k]
            for k in ("ok", "lut_ops", "clustered_tensors", "index_bits", "mlpackage_bytes", "weights_bytes")
        }
    return {
        "model": args.model or "bundled stories260K, k-means 3-bit, embeddings/head 8-bit",
        "packed_bytes": packed.stat().st_size,
        "fp16_bytes": fp16_bytes(model),
        "fp16_mlpackage_bytes": fp16_package(fp_model, work / "fp16.mlpackage", args.length)
        if fp_model is not None
        else None,
        "fp16_weights_bytes": package_bytes(work / "fp16.mlpackage" / WEIGHTS_DIR) if fp_model is not None else None,
        "coreml": rows,
        "coremltools": import_coremltools().__version__,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    main()
