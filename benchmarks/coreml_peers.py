"""coremltools' own post-training palettizers on SmolLM2-135M, under the real-model job's protocol.

    python benchmarks/coreml_peers.py [--bits 3] [--out benchmarks/results/smollm2_coreml_peers_3bit.json] [--resume]

Rows: PostTrainingPalettizer (k-means) and SKMPalettizer (sensitive k-means) per tensor and per 16 output channels,
the 8-bit embedding/head per tensor (coremltools' k-means for both). The protocol of `bash scripts/run.sh --model
smollm2-135m`: calibration on the 32 training sequences every post-training peer of `edkm compress` uses (the
instruction records' training split, 256 + 1 tokens), WikiText-2 test, first 16,384 tokens in 2048-token windows;
bits per weight read from each saved file. A row already in ``--out`` is kept with ``--resume``. One process, the
torch threads of the environment (record them beside the result).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import edkm
from edkm.config import EMBEDDING_LAYERS
from edkm.data.text import load_text, tokenize_text
from edkm.eval import perplexity
from edkm.jobs.compress import CompressConfig, split_data
from edkm.models import load_causal_lm
from edkm.peers.coreml_palettizers import coreml_kmeans_, coreml_skm_
from edkm.peers.fast import calibration
from edkm.peers.measure import bits_per_weight

ASSETS = Path(edkm.__file__).parent / "assets"
ROWS = {  # name -> (label, build(model, calibration, plan))
    "coreml_kmeans": ("coremltools PostTrainingPalettizer per tensor", lambda m, c, p: coreml_kmeans_(m, p)),
    "coreml_kmeans_g16": ("coremltools PostTrainingPalettizer per 16 rows", lambda m, c, p: coreml_kmeans_(m, p, 16)),
    "coreml_skm": ("coremltools SKMPalettizer per tensor", lambda m, c, p: coreml_skm_(m, c, p)),
    "coreml_skm_g16": ("coremltools SKMPalettizer per 16 rows", lambda m, c, p: coreml_skm_(m, c, p, 16)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/smollm2_coreml_peers_<bits>bit.json")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    args = parser.parse_args()
    out = Path(args.out or f"benchmarks/results/smollm2_coreml_peers_{args.bits}bit.json")
    result = json.loads(out.read_text()) if args.resume and out.is_file() else {"rows": {}}
    model, tokenizer = load_causal_lm("smollm2-135m")
    cfg = CompressConfig(model="smollm2-135m", alpaca=str(ASSETS / "instruction" / "instruction-data.json"))
    calib = calibration(split_data(cfg, tokenizer)[0])
    test = tokenize_text(tokenizer, load_text(str(ASSETS / "wikitext2" / "wiki.test.raw")))[:16384]
    plan = edkm.PalettizeConfig(bits=args.bits, overrides={EMBEDDING_LAYERS: {"bits": 8}})
    result.update(
        protocol="calibration: 32 training sequences of 257 tokens (edkm.peers.fast.calibration); WikiText-2 test, "
        "first 16,384 tokens, 2048-token windows",
        bits=args.bits,
        threads=torch.get_num_threads(),
    )
    for name in [r for r in args.rows.split(",") if r]:
        if name in result["rows"]:
            continue
        label, build = ROWS[name]
        start = time.perf_counter()
        peer = build(copy.deepcopy(model), calib, plan)
        built = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.edkm.safetensors"
            edkm.save_palettized(peer, path)
            bpw, size = bits_per_weight(path), path.stat().st_size
        result["rows"][name] = {
            "label": label,
            "ppl": perplexity(peer, test, context=2048),
            "bits_per_weight": bpw,
            "file_bytes": size,
            "build_seconds": round(built, 1),
        }
        result["loadavg_1min"] = os.getloadavg()[0]
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every row: a stopped run resumes
        print(f"{label}: ppl {result['rows'][name]['ppl']:.2f}, {bpw[str(args.bits)]:.3f} b/w, {built:.0f} s")


if __name__ == "__main__":
    main()
