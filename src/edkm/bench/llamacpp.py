"""llama.cpp (llama-cpp-python) beside edkm in ``edkm bench generate``: its files and its measurement.

The shipped SmolLM2 file is Q4_1; Q8_0 and Q4_0 files are written by llama.cpp's own quantizer from it
(``llama_model_quantize``, requantizing: these rows measure speed, not quality). Without llama-cpp-python
(``bash scripts/setup.sh --llamacpp`` builds it) the rows say so.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edkm.models.gguf import resolve_gguf
from edkm.rss import peak_rss_bytes, rss_bytes

GGUF_TYPES = {"q4_1": None, "q8_0": 7, "q4_0": 2}  # llama.cpp file types (LLAMA_FTYPE_MOSTLY_*); q4_1: shipped


def prepare_gguf(folder: Path, kinds: list[str]) -> dict[str, str]:
    """The shipped Q4_1 GGUF of SmolLM2 and, requantized from it by llama.cpp's own quantizer, Q8_0 / Q4_0 files
    (name -> path); empty without llama-cpp-python (the rows then say so)."""
    try:
        import llama_cpp  # deferred: optional (scripts/setup.sh --llamacpp), only for the llama.cpp rows
    except ImportError:
        return {}
    shipped, out = resolve_gguf("smollm2-135m"), {}
    for kind in kinds:
        if GGUF_TYPES[kind] is None:
            out[kind] = str(shipped)
            continue
        path = folder / f"smollm2-{kind}.gguf"
        if not path.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize = GGUF_TYPES[kind], True
            tmp = path.with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(shipped).encode(), str(tmp).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {shipped} to {kind}")
            tmp.replace(path)
        out[kind] = str(path)
    return out


def measure(spec: dict, prompt_of: Callable[[int], list[int]]) -> dict[str, Any]:
    """:func:`edkm.bench.generate_child.measure` of a GGUF file through llama.cpp: greedy on its own logits.

    ``prompt_of(vocab)``: the prompt token ids (the same seeded prompt as every other configuration's).
    """
    import llama_cpp  # deferred: optional (scripts/setup.sh --llamacpp), only for the llama.cpp rows

    gc.collect()
    baseline = rss_bytes() or 0
    threads = int(spec["threads"])
    t = time.perf_counter()
    llm = llama_cpp.Llama(
        spec["path"],
        n_ctx=spec["prompt_tokens"] + spec["new_tokens"] + 8,
        n_batch=spec["prompt_tokens"],
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - t
    load_peak = peak_rss_bytes() - baseline
    prompt = prompt_of(llm.n_vocab())

    t = time.perf_counter()
    greedy(llm, prompt[:8], 3)
    warmup = time.perf_counter() - t
    ttft, steps = greedy(llm, prompt, spec["new_tokens"])
    weights = gguf_bytes(spec["path"])
    return {
        "load_seconds": load_s,
        "load_peak_rss_bytes": load_peak,
        "warmup_seconds": warmup,
        "ttft_seconds": ttft,
        "prefill_tokens_per_second": spec["prompt_tokens"] / ttft,
        "decode_tokens_per_second": len(steps) / sum(steps),
        "decode_step_seconds_median": sorted(steps)[len(steps) // 2],
        "weight_bytes": weights["total"],
        "bytes_per_token": weights["per_token"],
        "peak_rss_bytes": peak_rss_bytes() - baseline,
        "loadavg_1min": os.getloadavg()[0],
        "threads": threads,
        "llama_cpp_python": llama_cpp.__version__,
    }


def greedy(llm: Any, ids: list[int], n: int) -> tuple[float, list[float]]:
    """(seconds to the first token, seconds of each later token) of greedy decoding on llama.cpp's logits."""
    import llama_cpp  # deferred: optional, only for the llama.cpp rows
    import numpy as np  # deferred: the llama.cpp rows only

    vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    token = next_token()
    ttft, steps = time.perf_counter() - t0, []
    for _ in range(n - 1):
        t = time.perf_counter()
        llm.eval([token])
        token = next_token()
        steps.append(time.perf_counter() - t)
    return ttft, steps


def gguf_bytes(path: str) -> dict[str, int]:
    """Tensor bytes of a GGUF file, and those a decode step reads (all but an untied token embedding)."""
    from gguf import GGUFReader  # deferred: the gguf extra

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    total = sum(tensors.values())
    untied = "output.weight" in tensors
    return {"total": total, "per_token": total - (tensors.get("token_embd.weight", 0) if untied else 0)}
