"""``edkm bench generate`` work in a fresh process:
``python -m edkm.bench.generate_child prepare|measure SPEC OUT``.

``prepare`` saves the dense and packed models (:func:`prepare`), and the llama.cpp files of a model that has a
GGUF. ``measure`` loads one model (dense Hugging Face folder in fp32 or bf16, a packed file, or a GGUF file for
llama.cpp), then measures, with ``spec["threads"]`` threads: load time and the peak RSS it added; warm-up (first
generation: kernel compilation); time to first token (one forward over a ``prompt_tokens`` prompt and the
arg-max: prefill tokens/s); greedy batch-1 decode tokens/s over ``new_tokens`` tokens with a KV cache; the
resident weight bytes (every distinct tensor storage the generation reads from); the bytes read per generated
token; RSS and peak RSS. Packed models run through the lean decode path (``runtime="lean"``, what
``model.generate`` uses) or transformers' forward (``runtime="hf"``) and report the whole-weight decodes (0 is
the point) and the logits' error against decode-then-matmul on the same prompt. ``bandwidth`` measures the
read bandwidth (``torch.sum`` over 1 GiB) that turns bytes per token into a tokens/s ceiling.
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

from edkm.bench import llamacpp
from edkm.bench.generate import LLAMA150M
from edkm.config import PalettizeConfig
from edkm.export import save_palettized
from edkm.generation import LeanLlama
from edkm.hf.load import load_palettized
from edkm.kernels import linear
from edkm.layers import lut
from edkm.layers.lut import LUTModule, LUTWeight, set_lut_kernel
from edkm.models import BUNDLED_MODEL_DIR, load_causal_lm
from edkm.peers.baselines import ptq_kmeans_
from edkm.rss import peak_rss_bytes, release_free_memory, reset_peak_rss, rss_bytes


def tensor_bytes(model: Any, lean: LeanLlama | None = None) -> dict[str, int]:
    """Bytes of the distinct storages of the model's parameters/buffers, int8 re-grids, the native kernel's packed
    copies and the lean model's fused weights: total and by dtype."""
    seen: dict[int, Any] = {}
    extra = [
        t for m in model.modules() if isinstance(m, LUTWeight) and m.int8 is not None for t in (m.int8.q, m.int8.scales)
    ]
    extra += [
        t
        for m in model.modules()
        if isinstance(m, LUTWeight) and m.views is not None and m.views.packed is not None
        for t in (m.views.packed.packed, m.views.packed.table)
    ]
    if lean is not None:
        extra += [t for p in lean.projections() for t in p.tensors()]
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


def greedy_lean(lean: LeanLlama, prompt: Any, new_tokens: int) -> tuple[float, list[float], Any]:
    """:func:`greedy` through the lean decode path (what ``model.generate`` runs for a packed Llama model)."""
    lean.reset()
    t0 = time.perf_counter()
    logits = lean.forward(prompt[0])
    token = logits.argmax().reshape(1)
    ttft, steps = time.perf_counter() - t0, []
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        token = lean.forward(token).argmax().reshape(1)
        steps.append(time.perf_counter() - t)
    return ttft, steps, logits


def bytes_per_token(model: Any, lean: LeanLlama | None) -> int:
    """Weight bytes one decode step reads: every projection (packed where packed) and the norms; an untied
    embedding contributes one row (0 here), a tied one is read whole as the head."""
    if lean is not None:
        return sum(t.untyped_storage().nbytes() for p in lean.projections() for t in p.tensors()) + sum(
            t.numel() * t.element_size() for layer in lean.layers for t in (layer.input_norm, layer.post_norm)
        )
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    shared = lambda m: (m.lut,) if isinstance(m, LUTModule) else tuple(m.parameters())  # noqa: E731
    tied = head is not None and any(a is b for a in shared(head) for b in shared(embed))
    skip = set() if tied else {id(t) for t in shared(embed)}  # an untied embedding reads one row per token
    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, LUTWeight) and id(m) not in skip:
            held = m.views.packed.packed if m.views is not None and m.views.packed is not None else None
            total += (held if held is not None else m.packed if m.compact else m.indices).numel()
    for p in model.parameters():
        if id(p) not in skip and p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            total += p.numel() * p.element_size()
    return total


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
    if spec["kind"] == "llamacpp":
        return llamacpp.measure(spec, lambda vocab: prompt_ids(spec, vocab)[0].tolist())
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
    del model  # loaded again: the second load's peak is the weights' own (the first one's also holds the
    gc.collect()  # one-time costs of a fresh process: the native kernel's library, modules imported on first use)
    release_free_memory()
    reset_peak_rss()
    warm_baseline = rss_bytes() or 0
    model = load(spec).eval()
    warm_peak = peak_rss_bytes() - warm_baseline
    at_load = tensor_bytes(model)
    prompt = prompt_ids(spec, model.config.vocab_size)
    result: dict[str, Any] = {
        "load_seconds": load_s,
        "load_peak_rss_bytes": load_peak,
        "rss_after_load_bytes": after_load,
        "load_again_peak_rss_bytes": warm_peak,
        "weight_bytes_at_load": at_load["total"],
    }
    lean_path = spec["kind"] == "packed" and spec.get("runtime", "lean") == "lean"
    with torch.no_grad():
        t = time.perf_counter()
        lean = LeanLlama(model, spec["prompt_tokens"] + spec["new_tokens"]) if lean_path else None
        run = (lambda p, n: greedy_lean(lean, p, n)) if lean is not None else (lambda p, n: greedy(model, p, n))
        run(prompt[:, :8], 3)  # warm-up: builds the lean model / compiles the packed kernels
        result["warmup_seconds"] = time.perf_counter() - t
        with DecodeCounter() as decodes:
            ttft, steps, logits = run(prompt, spec["new_tokens"])
        weights = tensor_bytes(model, lean)
        result.update(
            ttft_seconds=ttft,
            prefill_tokens_per_second=spec["prompt_tokens"] / ttft,
            decode_tokens_per_second=len(steps) / sum(steps) if steps else None,
            decode_step_seconds_median=sorted(steps)[len(steps) // 2] if steps else None,
            whole_weight_decodes=decodes.count,
            weight_bytes=weights["total"],
            weight_bytes_by_dtype=weights,
            bytes_per_token=bytes_per_token(model, lean),
            native_step=lean is not None and lean.step is not None,
            peak_rss_bytes=peak_rss_bytes() - baseline,
            loadavg_1min=os.getloadavg()[0],
        )
        if spec["kind"] == "packed":
            result.update(logit_errors(model, lean, prompt))
    result.update(threads=torch.get_num_threads(), torch=torch.__version__)
    return result


def prompt_ids(spec: dict, vocab: int) -> Any:
    """The seeded random prompt (1, prompt_tokens) every configuration of a model decodes after."""
    gen = torch.Generator().manual_seed(spec["seed"])
    return torch.randint(3, vocab, (1, spec["prompt_tokens"]), generator=gen)


def logit_errors(model: Any, lean: LeanLlama | None, prompt: Any) -> dict[str, float]:
    """max |packed - decode-then-matmul| / max |decode-then-matmul| of the last logits: a 1-token step after a
    63-token prefix (``gemv``: the decode path) and a 64-token prefill (``prefill``)."""
    if lean is not None:
        lean.reset()
        prefill = lean.forward(prompt[0, :64])
        lean.reset()
        lean.forward(prompt[0, :63])
        step = lean.forward(prompt[0, 63:64])
        ours = [step, prefill]
    else:
        out = model(prompt[:, :63], use_cache=True)
        step = model(prompt[:, 63:64], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
        ours = [step.float(), model(prompt[:, :64]).logits[0, -1].float()]
    set_lut_kernel(model, "decode")
    ref = model(prompt[:, :64]).logits[0, -1].float()
    return {
        f"logits_rel_error_{name}": float((a - ref).abs().max() / ref.abs().max())
        for name, a in zip(("gemv", "prefill"), ours)
    }


def bandwidth(spec: dict) -> dict[str, Any]:
    """Read bandwidth in bytes/s at ``threads`` threads: the best of 5 ``torch.sum`` over a 1 GiB fp32 tensor."""
    torch.set_num_threads(int(spec["threads"]))
    x = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return {"read_bytes_per_second": x.numel() * 4 / best, "threads": torch.get_num_threads()}


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
    ggufs = llamacpp.prepare_gguf(folder, spec.get("gguf", [])) if spec["model"] == "smollm2" else {}
    files.update({name: Path(path).stat().st_size for name, path in ggufs.items()})
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    return {
        "dense_dir": str(dense_dir),
        "gguf": ggufs,
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
    jobs = {"prepare": prepare, "measure": measure, "profile": kernel_profile, "bandwidth": bandwidth}
    result = jobs[what](json.loads(spec_json))
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
