"""`edkm plan`: per-GPU peak memory of fine-tuning a model with FSDP2, computed without its weights.

    edkm plan llama-7b --bits 3 --gpus 8 --gpu-memory-gib 80 [--json plan.json]

Parts of the per-GPU peak (the moment backward starts, or the optimizer step if larger), and how
each is obtained:

* **states** (fp32 master weights, AdamW's two moments; 12 bytes per parameter) and **gradients**
  (4 bytes), sharded over the GPUs by FSDP2 — analytic (exact for AdamW with fp32 master weights).
  Gradients grow while backward frees the activations: peak = states + gathered layers +
  max(gradients, what backward starts with + the first (output-layer) gradient).
* **gathered layers**: FSDP2 holds the unsharded parameters of the layer computing and of the one
  prefetched: 2 x the largest decoder layer (0 on one GPU) — analytic.
* **activations**: the bytes autograd saves for backward, counted storage by storage
  (:func:`edkm.memory.track_saved`) while the real Hugging Face model runs forward on
  ``FakeTensorMode`` tensors (shapes only, no weights, no compute), with 1 and 2 decoder layers; the
  per-layer difference is scaled to every layer. Plus the logits' gradient (transient of backward).
* **clustered weights W_hat** under sharded DKM: each rank keeps its rows of every clustered weight
  for backward, where they are gathered again (one layer at a time with activation checkpointing)
  — analytic, |W| x bytes / GPUs. The single-device modes recompute W_hat in backward.
* **DKM saved tensors** per memory mode: measured with :func:`edkm.memory.track_saved` running the
  real DKM on real palettized 512 x 512 and 1024 x 1024 ``nn.Linear`` layers; the bytes are split into a
  per-weight part (scaled by |W|), a per-distinct-value part (up to 65,536 per LUT for 16-bit
  weights) and a per-tensor part (fused DKM's tables), held for every clustered weight until backward.
  "coremltools" is plain DKM (the full |W| x |C| maps); M moves saved tensors to the host (counted
  under ``host``); S divides its sharded part by the GPUs;
  "sharded" is :mod:`edkm.distributed.sharded` (tables only).

torch.distributed._tools' FSDPMemTracker runs on a fake process group here, but took ~55 s for two
LLaMA-7B layers on this machine and cannot follow DKM (its tables depend on the weights' values),
so it is not used; the parts above are the documented fall-back. See the README for the
validation against measured training steps.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from edkm.config import PalettizeConfig
from edkm.jobs.size import GiB, load_config
from edkm.memory import track_saved
from edkm.transform import palettize_, target_modules

MODES = (
    "plain-ft",
    "coremltools",
    "marshal",
    "marshal+unique",
    "marshal+shard",
    "marshal+unique+shard",
    "fused",
    "sharded",
)


@dataclass
class PlanOptions:
    bits: int = 3
    embed_bits: int = 8  # embedding and output layer (0 = same as bits)
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    batch: int = 1  # sequences per GPU
    seq: int = 2048
    mixed_precision: bool = True  # bf16 compute (activations, gathered layers, W_hat)
    activation_checkpointing: bool = False
    iters: int = 3


def _model(config: Any, layers: int, device: str | None = "meta", dtype: torch.dtype = torch.float32) -> nn.Module:
    # deferred: transformers is the hf extra, loaded only when a Hugging Face model is built
    from transformers import AutoModelForCausalLM

    config = type(config).from_dict({**config.to_dict(), "num_hidden_layers": layers})
    with torch.device(device) if device else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def activation_bytes(config: Any, batch: int, seq: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes saved for backward outside the decoder layers, bytes per decoder layer), FakeTensorMode."""
    saved = []
    for layers in (1, 2):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            model = _model(config, layers, device=None, dtype=dtype)  # fake parameters: shapes only
            ids = mode.from_tensor(torch.zeros(batch, seq, dtype=torch.long))
            with track_saved() as stats:
                model(ids).logits.float()
        saved.append(stats.device_bytes)
    per_layer = saved[1] - saved[0]
    return saved[0] - per_layer, per_layer


def _saved_by_dkm(
    mode: str, size: int, k: int, iters: int, world: int, dtype: torch.dtype
) -> tuple[float, float, float, int]:
    """(device bytes, host bytes, U's distinct-row bytes, distinct values) a palettized ``size`` x ``size``
    Linear in ``dtype`` holds for backward beyond the plain layer, in memory ``mode``; S's share per rank."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(size, size, bias=False)).to(dtype)
    with torch.no_grad():
        plain[0].weight.mul_(0.05)
    x = torch.randn(4, size, dtype=dtype, requires_grad=True)  # as inside a model: the matmul keeps its weight
    with track_saved() as base:
        plain(x)
    distinct = int(torch.unique(plain[0].weight.detach().to(torch.bfloat16)).numel())
    spec = {"coremltools": "plain"}.get(mode, mode).replace("+shard", "")  # S measured unsharded, divided below
    model = palettize_(
        copy.deepcopy(plain), PalettizeConfig(bits=k.bit_length() - 1, iters=iters, tau=0.05), memory=spec
    )
    with torch.no_grad():
        model(x)  # first-step k-means
    with track_saved() as stats:
        model(x)
    device, host = stats.device_bytes - base.device_bytes, stats.host_bytes
    rows = stats.kinds.get("rows", 0)  # U's distinct rows
    index = stats.kinds.get("index", 0)  # U's index list
    on_host = "marshal" in spec
    if on_host:
        host -= rows
    else:
        device -= rows
    if "shard" in mode:  # S keeps 1/N of U's index list, or of every per-weight saved map without U
        part = index if "unique" in spec else host if on_host else device
        if on_host:
            host -= part * (1 - 1 / world)
        else:
            device -= part * (1 - 1 / world)
    return device, host, rows, distinct


def dkm_coefficients(
    modes: tuple[str, ...], k: int, iters: int, world: int, dtype: torch.dtype
) -> dict[str, tuple[float, float, float, float, float, float]]:
    """Per memory mode: device bytes (per weight, per distinct value, per tensor), then the same on the host.

    Measured with :func:`edkm.memory.track_saved` on real palettized square ``nn.Linear`` layers of two
    sizes (512 and 1024; 128 and 256 for k > 16) in ``dtype``: what the training forward holds for
    backward beyond what the plain layer holds. The two sizes split it into a part that grows with
    the weight (maps of |W| x k, a rounded copy) and a part that does not (fused DKM's tables over the
    65,536 16-bit values): extrapolating a 512 x 512 layer per weight would charge a 4096 x 4096
    layer 64x its tables.
    """
    small = 512 if k <= 16 else 128  # plain DKM holds |W| x k maps: keep them small
    out = {}
    for mode in modes:
        if mode in ("plain-ft", "sharded"):
            continue
        (d1, h1, rows, distinct), (d2, h2, _, _) = (
            _saved_by_dkm(mode, n, k, iters, world, dtype) for n in (small, 2 * small)
        )
        numel = small * small
        per_w, host_w = (
            max(0.0, (d2 - d1) / (3 * numel)),
            max(0.0, (h2 - h1) / (3 * numel)),
        )  # 2x the side: 4x the weights
        per_u = rows / distinct
        on_host = "marshal" in mode
        out[mode] = (
            per_w,
            0.0 if on_host else per_u,
            max(0.0, d1 - per_w * numel),
            host_w,
            per_u if on_host else 0.0,
            max(0.0, h1 - host_w * numel),
        )
    return out


def _weights(config: Any, opts: PlanOptions) -> tuple[nn.Module, int, dict[int, tuple[int, int]], int]:
    """(meta model, parameters, id(weight) -> (numel, k) of every clustered weight, largest decoder layer)."""
    meta = _model(config, config.num_hidden_layers)
    overrides = {"embed_tokens|lm_head": {"bits": opts.embed_bits}} if opts.embed_bits else {}
    pcfg = PalettizeConfig(bits=opts.bits, overrides=overrides)
    params = sum(p.numel() for p in {id(p): p for p in meta.parameters()}.values())
    clustered: dict[int, tuple[int, int]] = {}  # id(weight) -> (numel, k)
    for name, module in target_modules(meta, pcfg):
        clustered.setdefault(id(module.weight), (module.weight.numel(), pcfg.for_module(name).k))
    layer = max(sum(p.numel() for p in m.parameters()) for m in meta.model.layers)
    return meta, params, clustered, layer


def _mode_bytes(
    mode: str,
    clustered: dict[int, tuple[int, int]],
    coeffs: dict[int, dict[str, tuple[float, float, float, float, float, float]]],
    opts: PlanOptions,
    dtype: torch.dtype,
    w_hat: float,
    live: float,
) -> tuple[float, float]:
    """(device, host) bytes ``mode`` holds for its clustered weights; fills ``coeffs`` (per k) as it goes."""
    n, distinct_cap = opts.gpus, 1 << 16
    device = host = 0.0
    if mode == "sharded":  # each rank keeps its rows of every W_hat (GatheredLinear), fp32: the rounded copy too
        device += w_hat / n + (0 if opts.mixed_precision else 4 * sum(v[0] for v in clustered.values()) * live / n)
    if mode not in ("plain-ft", "sharded"):
        for numel, k in clustered.values():
            if k not in coeffs:
                coeffs[k] = dkm_coefficients(MODES, k, opts.iters, n, dtype)
            per_w, per_u, per_t, host_w, host_u, host_t = coeffs[k][mode]
            device += (per_w * numel + per_u * min(numel, distinct_cap) + per_t) * live
            host += (host_w * numel + host_u * min(numel, distinct_cap) + host_t) * live
    elif mode == "sharded":  # saved pair tables (int64 pattern + fp64 count per distinct value) per weight
        device += sum(16 * min(numel, distinct_cap) for numel, _ in clustered.values()) * live
    return device, host


def estimate(model_spec: str | Any, opts: PlanOptions) -> dict[str, Any]:
    """Per-GPU peak bytes of every mode (see the module docstring for how each part is obtained).

    ``model_spec``: a preset name, a config.json / model folder, or a transformers config object.
    """
    config = load_config(model_spec) if isinstance(model_spec, str) else model_spec
    if opts.gpus < 1 or opts.batch < 1 or opts.seq < 1:
        raise ValueError(f"gpus, batch and seq must be >= 1, got {opts.gpus}, {opts.batch}, {opts.seq}")
    meta, params, clustered, layer = _weights(config, opts)
    L, n = config.num_hidden_layers, opts.gpus
    act_bytes = 2 if opts.mixed_precision else 4
    dtype = torch.bfloat16 if opts.mixed_precision else torch.float32
    rest, per_layer = activation_bytes(config, opts.batch, opts.seq, dtype)
    hidden = opts.batch * opts.seq * config.hidden_size * act_bytes
    acts = rest + (L * hidden + per_layer if opts.activation_checkpointing else L * per_layer)
    logits_grad = (
        3 * opts.batch * opts.seq * config.vocab_size * 4
    )  # fp32 log-softmax kept by the loss, its and the logits' gradients
    states = 12 * params / n  # fp32 master weights and AdamW's two moments; the gradients are counted below
    grads = 4 * params / n
    largest_grad = 4 * max(p.numel() for p in meta.parameters()) / n  # the first gradient of backward (output layer)
    gathered = 2 * layer * act_bytes if n > 1 else 0
    live = 1 / L if opts.activation_checkpointing else 1.0  # share of clustered weights whose DKM state is held at once
    w_hat = sum(numel for numel, _ in clustered.values()) * act_bytes * live
    rows: list[dict[str, Any]] = []
    coeffs: dict[int, dict[str, tuple[float, float, float, float, float, float]]] = {}
    for mode in MODES:
        device, host = _mode_bytes(mode, clustered, coeffs, opts, dtype, w_hat, live)
        peak = states + gathered + max(grads, acts + logits_grad + largest_grad + device)
        rows.append(
            {"mode": mode, "peak_gib": peak / GiB, "host_gib": host / GiB, "fits": peak <= opts.gpu_memory_gib * GiB}
        )
    return {
        "model": model_spec if isinstance(model_spec, str) else config.to_dict(),
        "params": params,
        "clustered_params": sum(v[0] for v in clustered.values()),
        "options": asdict(opts),
        "parts_gib": {
            "states": states / GiB,
            "grads": grads / GiB,
            "gathered_layers": gathered / GiB,
            "activations": acts / GiB,
            "logits_grad": logits_grad / GiB,
            "w_hat": w_hat / GiB,
        },
        "modes": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    o = result["options"]
    lines = [
        f"{result['model']}: {result['params'] / 1e9:.2f} B parameters, "
        f"{o['gpus']} GPU(s) of {o['gpu_memory_gib']:g} GiB, "
        f"{o['bits']}-bit ({o['embed_bits']}-bit embeddings), batch {o['batch']} x {o['seq']} tokens per GPU",
        "",
        "| mode | per-GPU peak (GiB) | host (GiB) | fits |",
        "| --- | ---: | ---: | :---: |",
    ]
    for r in result["modes"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] < 1e5 else f"{r['peak_gib']:.2e}"
        lines.append(f"| {r['mode']} | {peak} | {r['host_gib']:.1f} | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines)
