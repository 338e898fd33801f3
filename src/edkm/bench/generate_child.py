"""``edkm bench generate`` work in a fresh process:
``python -m edkm.bench.generate_child prepare|measure SPEC OUT``.

``prepare`` saves the dense and packed models (:func:`prepare`). ``measure`` loads one model (dense
Hugging Face folder in fp32 or bf16, or a packed file), then measures, with
``torch.set_num_threads(spec["threads"])``: load time and the peak RSS it added; warm-up (first
generation: kernel compilation); time to first token (one forward over a ``prompt_tokens`` prompt
and the arg-max); greedy batch-1 decode tokens/s over ``new_tokens`` tokens with a KV cache; the
resident weight bytes (every distinct parameter/buffer storage of the model); RSS and peak RSS.
Packed models also report the whole-weight decodes per generated token (0 is the point) and the
logits' error against decode-then-matmul on the same prompt.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edkm.bench.generate import LLAMA150M
from edkm.config import PalettizeConfig
from edkm.export import save_palettized
from edkm.hf.load import load_palettized
from edkm.kernels import linear
from edkm.layers import lut
from edkm.layers.lut import LUTWeight, set_lut_kernel
from edkm.models import BUNDLED_MODEL_DIR, load_causal_lm
from edkm.peers.baselines import ptq_kmeans_
from edkm.rss import peak_rss_bytes, rss_bytes


def tensor_bytes(model: Any) -> dict[str, int]:
    """Bytes of the model's distinct parameter/buffer storages (and int8 re-grids): total and by dtype."""
    seen: dict[int, Any] = {}
    extra = [
        t for m in model.modules() if isinstance(m, LUTWeight) and m.int8 is not None for t in (m.int8.q, m.int8.scales)
    ]
    for t in [*model.parameters(), *model.buffers(), *extra]:
        if t.device.type != "meta":
            seen.setdefault(t.untyped_storage().data_ptr(), t)
    by_dtype: dict[str, int] = {}
    for t in seen.values():
        key = str(t.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + t.untyped_storage().nbytes()
    return {"total": sum(by_dtype.values()), **by_dtype}


def load(spec: dict) -> Any:
    if spec["kind"] == "packed":
        model = load_palettized(spec["path"])
        if spec.get("kernel"):
            set_lut_kernel(model, spec["kernel"])
        return model
    # deferred: transformers is the hf extra (the kernel profile runs without it)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        spec["path"], dtype=getattr(torch, spec["dtype"]), local_files_only=True
    )


def greedy(model: Any, prompt: Any, new_tokens: int) -> tuple[float, list[float], Any]:
    """(seconds to the first token, seconds of each later token, the first token's logits) of greedy decoding."""
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True)
    logits = out.logits[:, -1].float()
    token = logits.argmax(-1, keepdim=True)
    ttft = time.perf_counter() - t0
    past, steps = out.past_key_values, []
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t)
    del past, out
    return ttft, steps, logits


class DecodeCounter:
    """Counts whole-weight decodes (``edkm.decode`` calls from the LUT layers and kernels) while active."""

    def __enter__(self) -> DecodeCounter:
        self.modules, self.count = (lut, linear), 0
        self.original = lut.decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return self.original(*args, **kwargs)

        for m in self.modules:
            m.decode = counting
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in self.modules:
            m.decode = self.original


def measure(spec: dict) -> dict[str, Any]:
    # deferred: transformers is the hf extra (the kernel profile runs without it); imported before the
    # baseline, as every configuration needs it, so that its import is not counted as load memory
    from transformers import LlamaForCausalLM  # noqa: F401

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    gc.collect()
    baseline = rss_bytes() or 0
    t = time.perf_counter()
    model = load(spec).eval()
    load_s = time.perf_counter() - t
    load_peak = peak_rss_bytes() - baseline
    after_load = (rss_bytes() or 0) - baseline
    weights = tensor_bytes(model)
    gen = torch.Generator().manual_seed(spec["seed"])
    prompt = torch.randint(3, model.config.vocab_size, (1, spec["prompt_tokens"]), generator=gen)
    result: dict[str, Any] = {
        "load_seconds": load_s,
        "load_peak_rss_bytes": load_peak,
        "rss_after_load_bytes": after_load,
        "weight_bytes": weights["total"],
        "weight_bytes_by_dtype": weights,
    }
    with torch.no_grad():
        t = time.perf_counter()
        greedy(model, prompt[:, :8], 3)  # warm-up: compiles the packed kernels (one per shape)
        result["warmup_seconds"] = time.perf_counter() - t
        with DecodeCounter() as decodes:
            ttft, steps, logits = greedy(model, prompt, spec["new_tokens"])
        result.update(
            ttft_seconds=ttft,
            decode_tokens_per_second=len(steps) / sum(steps) if steps else None,
            decode_step_seconds_median=sorted(steps)[len(steps) // 2] if steps else None,
            whole_weight_decodes=decodes.count,
            peak_rss_bytes=peak_rss_bytes() - baseline,
            loadavg_1min=os.getloadavg()[0],
        )
        if spec["kind"] == "packed":
            result["compile_failed"] = linear.fused_gemv().failed
            auto = [model(prompt[:, :n]).logits.float() for n in (1, 64)]  # fused GEMV; tiled prefill
            set_lut_kernel(model, "decode")
            ref = [model(prompt[:, :n]).logits.float() for n in (1, 64)]
            for name, a, r in zip(("gemv", "prefill"), auto, ref):
                result[f"logits_rel_error_{name}"] = float((a - r).abs().max() / r.abs().max())
    result.update(threads=torch.get_num_threads(), torch=torch.__version__)
    return result


def prepare(spec: dict) -> dict[str, Any]:
    """Save the dense model (a Hugging Face folder) and its packed variants unless already there."""
    folder = Path(spec["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    if spec["model"] == "stories260k":
        dense_dir, model = BUNDLED_MODEL_DIR, load_causal_lm()[0]
    elif spec["model"] == "smollm2":  # the real LLM: its GGUF dequantized, saved as a dense fp32 folder once
        dense_dir = folder / "dense"
        model = load_causal_lm("smollm2-135m")[0]
        if not (dense_dir / "model.safetensors").is_file():
            model.save_pretrained(dense_dir)
    else:
        # deferred: transformers is the hf extra (the kernel profile runs without it)
        from transformers import LlamaConfig, LlamaForCausalLM

        dense_dir = folder / "dense"
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA150M))
        if not (dense_dir / "model.safetensors").is_file():
            model.save_pretrained(dense_dir)
    files = {"dense": sum(f.stat().st_size for f in Path(dense_dir).glob("*.safetensors"))}
    for bits, embed_bits, name in spec["packed"]:
        path = folder / name
        if not path.is_file():
            overrides = {"embed_tokens|lm_head": {"bits": embed_bits}} if embed_bits else {}
            packed = ptq_kmeans_(copy.deepcopy(model), PalettizeConfig(bits=bits, overrides=overrides))
            save_palettized(packed, path)
            del packed
        files[name] = path.stat().st_size
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    return {
        "dense_dir": str(dense_dir),
        "file_bytes": files,
        "params": sum(p.numel() for p in model.parameters()),
        "largest_weight_fp32_bytes": max(p.numel() for p in weights) * 4,
    }


def kernel_profile(spec: dict) -> dict[str, Any]:
    """Batch-1 time per weight of each Linear shape: dense fp32 ``F.linear`` against the packed kernels.

    Interleaved in one process (so the machine's load hits both alike); ``copies`` weights per shape
    are cycled so that dense weights stream from memory as in a real model.
    """
    torch.set_num_threads(int(spec["threads"]))
    gen, rows = torch.Generator().manual_seed(0), []
    for rows_, cols in spec["shapes"]:
        n = max(1, min(8, (64 << 20) // (rows_ * cols * 4)))  # >= 64 MiB of fp32 weights per shape
        x = torch.randn(1, cols, generator=gen)
        dense = [torch.randn(rows_, cols, generator=gen) * 0.02 for _ in range(n)]
        timings: dict[str, Any] = {"shape": [rows_, cols]}
        for bits in spec["bits"]:
            packed = [
                LUTWeight(
                    (torch.randn(1, 1 << bits, generator=gen) * 0.02).half(),
                    torch.randint(0, 1 << bits, (1, rows_ * cols), generator=gen).to(torch.uint8),
                    torch.Size([rows_, cols]),
                    bits,
                    torch.float32,
                )
                for _ in range(n)
            ]
            with torch.no_grad():
                for w in packed:
                    w.linear(x)  # compile
                calls = {
                    "dense": [partial(F.linear, x, w) for w in dense],
                    "packed": [partial(w.linear, x) for w in packed],
                }
                best = {"dense": float("inf"), "packed": float("inf")}
                for _ in range(spec["repeats"]):
                    for name, fns in calls.items():
                        t = time.perf_counter()
                        for fn in fns:
                            fn()
                        best[name] = min(best[name], (time.perf_counter() - t) / n)
            timings[f"{bits}bit"] = {
                "dense_ms": best["dense"] * 1e3,
                "packed_ms": best["packed"] * 1e3,
                "packed_ns_per_weight": best["packed"] * 1e9 / (rows_ * cols),
                "dense_ns_per_weight": best["dense"] * 1e9 / (rows_ * cols),
            }
            del packed, calls
        rows.append(timings)
    return {"rows": rows, "loadavg_1min": os.getloadavg()[0], "threads": torch.get_num_threads()}


def main(argv: list[str]) -> int:
    what, spec_json, result_path = argv
    result = {"prepare": prepare, "measure": measure, "profile": kernel_profile}[what](json.loads(spec_json))
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
