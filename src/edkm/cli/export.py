"""``edkm export coreml MODEL --out NAME.mlpackage [--target ios18|ios16] [--kv-cache]``.

Building the parser imports nothing heavy; the command loads the compressed model (the Hugging Face
folder ``edkm compress --out DIR`` writes, or a single packed file), converts it with
coremltools (our LUTs, nothing re-clustered), reads the package back and prints the verification and
the sizes (.mlpackage, our packed file, fp16) as JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_export_coreml(args: argparse.Namespace) -> None:
    # deferred: coremltools, torch and transformers load only when the command runs
    from edkm.coreml.convert import export_coreml, import_coremltools
    from edkm.coreml.verify import verify_mlpackage
    from edkm.hf.load import load_palettized
    from edkm.jobs.runfolder import locate_packed

    if not args.out.endswith(".mlpackage"):
        raise ValueError(f"--out must name a .mlpackage folder, got {args.out!r}")
    import_coremltools()  # fail before loading anything when the extra is missing
    source, packed = locate_packed(args.model)
    model = load_palettized(source).eval()
    out = export_coreml(model, args.out, target=args.target, kv_cache=args.kv_cache, length=args.length)
    report: dict[str, Any] = {
        "mlpackage": str(out),
        "kv_cache": args.kv_cache,
        **verify_mlpackage(out, model, args.target),
    }
    report["packed_bytes"] = packed.stat().st_size
    if args.target == "ios16":
        report["note"] = (
            "iOS 16 LUTs take 2/4/16/64/256 entries: b-bit LUTs padded (3 bits -> 16 entries, 4-bit indices)"
        )
    print(json.dumps(report, indent=1))
    if not report["ok"]:
        raise RuntimeError(f"{out} does not hold our exact LUTs: {'; '.join(report['problems'][:3])}")


def add_export_parser(sub: Any) -> None:
    """Register ``edkm export coreml``."""
    p = sub.add_parser("export", help="convert a packed model for another runtime (Core ML)")
    formats = p.add_subparsers(dest="format", required=True)
    c = formats.add_parser(
        "coreml", help="Core ML .mlpackage with our LUTs (constexpr_lut_to_dense); needs coremltools"
    )
    c.add_argument(
        "model", help="compressed model: the folder edkm compress --out wrote, or a packed .safetensors file"
    )
    c.add_argument("--out", required=True, help="NAME.mlpackage")
    c.add_argument(
        "--target",
        choices=["ios18", "ios16"],
        default="ios18",
        help="ios18: b-bit indices, LUT per group; ios16: LUTs padded to 2/4/16/64/256 entries, one per tensor",
    )
    c.add_argument(
        "--kv-cache", action="store_true", help="stateful model: fp16 key/value caches as Core ML states (iOS 18)"
    )
    c.add_argument("--length", type=int, default=64, help="sequence length (with --kv-cache: the cache length)")
    c.set_defaults(func=cmd_export_coreml)
