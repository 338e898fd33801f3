#!/usr/bin/env python
"""Regenerate the bundled Hugging Face checkpoint ``src/edkm/assets/stories260K`` from its llama2.c originals.

Usage (from the repository root)::

    python scripts/convert_stories260k.py            # in place: reads and writes src/edkm/assets/stories260K/
    python scripts/convert_stories260k.py --out /tmp/stories260K-hf

Writes config.json, generation_config.json, model.safetensors, tokenizer.json and tokenizer_config.json next to the
original ``stories260K.bin`` / ``tok512.bin`` (which it leaves untouched). Needs ``transformers`` and ``tokenizers``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSET_DIR = ROOT / "src" / "edkm" / "assets" / "stories260K"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, default=ASSET_DIR / "stories260K.bin", help="llama2.c model (.bin)")
    parser.add_argument("--tok", type=Path, default=ASSET_DIR / "tok512.bin", help="llama2.c tokenizer (.bin)")
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="output Hugging Face checkpoint folder")
    args = parser.parse_args(argv)
    try:
        from edkm.models.llama2c import llama2c_to_hf
    except ImportError:  # not installed: use the source tree
        sys.path.insert(0, str(ROOT / "src"))
        from edkm.models.llama2c import llama2c_to_hf
    out = llama2c_to_hf(args.bin, args.tok, args.out)
    print(f"wrote Hugging Face checkpoint to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
