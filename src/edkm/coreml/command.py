"""``edkm export coreml MODEL --out NAME.mlpackage [--target ios18|ios16] [--kv-cache]``.

Building the parser imports nothing heavy; the command loads the packed model, converts it with
coremltools (our LUTs, nothing re-clustered), reads the package back and prints the verification and
the sizes (.mlpackage, our packed file, fp16) as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PACKED_NAMES = ("model.edkm.safetensors", "model.safetensors")  # what a folder holds: compress output, HF-style folder


def resolve_packed(path: str | Path) -> Path:
    """The packed edkm file ``path`` names: the file itself, or the packed file inside a folder.

    >>> resolve_packed("/nonexistent/model.edkm.safetensors")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no packed edkm model at /nonexistent/model.edkm.safetensors
    """
    path = Path(path)
    if path.is_dir():
        for name in PACKED_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no packed edkm model ({' or '.join(PACKED_NAMES)}) in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"no packed edkm model at {path}")
    return path


def cmd_export_coreml(args: argparse.Namespace) -> None:
    from ..export import load_palettized
    from .convert import export_coreml, import_coremltools
    from .verify import verify_mlpackage

    if not args.out.endswith(".mlpackage"):
        raise ValueError(f"--out must name a .mlpackage folder, got {args.out!r}")
    import_coremltools()  # fail before loading anything when the extra is missing
    packed = resolve_packed(args.model)
    model = load_palettized(packed).eval()
    out = export_coreml(model, args.out, target=args.target, kv_cache=args.kv_cache, length=args.length)
    report: dict[str, Any] = {"mlpackage": str(out), "kv_cache": args.kv_cache, **verify_mlpackage(out, model, args.target)}
    report["packed_bytes"] = packed.stat().st_size
    if args.target == "ios16":
        report["note"] = "iOS 16 LUTs take 2/4/16/64/256 entries: b-bit LUTs padded (3 bits -> 16 entries, 4-bit indices)"
    print(json.dumps(report, indent=1))
    if not report["ok"]:
        raise RuntimeError(f"{out} does not hold our exact LUTs: {'; '.join(report['problems'][:3])}")


def add_export_parser(sub: Any) -> None:
    """Register ``edkm export coreml``."""
    p = sub.add_parser("export", help="convert a packed model for another runtime (Core ML)")
    formats = p.add_subparsers(dest="format", required=True)
    c = formats.add_parser("coreml", help="Core ML .mlpackage with our LUTs (constexpr_lut_to_dense); needs coremltools")
    c.add_argument("model", help="packed model: model.edkm.safetensors or the folder holding it")
    c.add_argument("--out", required=True, help="NAME.mlpackage")
    c.add_argument("--target", choices=["ios18", "ios16"], default="ios18",
                   help="ios18: b-bit indices, LUT per group; ios16: LUTs padded to 2/4/16/64/256 entries, one per tensor")
    c.add_argument("--kv-cache", action="store_true", help="stateful model: fp16 key/value caches as Core ML states (iOS 18)")
    c.add_argument("--length", type=int, default=64, help="sequence length (with --kv-cache: the cache length)")
    c.set_defaults(func=cmd_export_coreml)
