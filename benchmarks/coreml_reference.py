"""Outside reference for the memory benchmark: coremltools' train-time DKM palettization on CPU.

One ``nn.Linear`` (wrapped in ``nn.Sequential``) is palettized with
``coremltools.optimize.torch.palettization.DKMPalettizer`` (``n_bits=bits``, per-tensor LUT,
coremltools' default advanced options unless overridden) and one training step
(forward, ``sum().backward()``, ``palettizer.step()``; no optimizer) is measured.

Every measurement runs in a fresh ``python`` subprocess so that its peak RSS (``VmHWM``) is clean:

* **first step**: prepare() then step 1, which runs coremltools' k-means init (``kmeans++`` with
  ``kmeans_n_init=10`` restarts of up to 100 Lloyd iterations for tensors > 1024 weights) inside
  the forward, then the DKM forward+backward. Its centroids are saved to a temp file.
* **steady state**: a new process builds the same (seeded) layer, prepares it, installs the
  step-1 centroids (exactly the state the palettizer has after step 1: centroids tensor set,
  labels ``None``), then times one forward+backward, which is what step 2 of a training run does.

``footprint_bytes``/``device_bytes``: the bytes autograd saved for backward during the palettized
forward (every ``torch.autograd.graph.saved_tensors_hooks`` pack, each storage counted once by
``(untyped_storage().data_ptr(), nbytes)``; the saved tensors stay alive in the graph until backward,
so addresses cannot be reused in between). With the default ``palett_max_mem=1.0`` coremltools
installs no saved-tensor hooks of its own, so every saved tensor passes through ours. Everything is
on the CPU, nothing is offloaded, so ``host_bytes`` and ``copied_bytes`` are 0.

Usage::

    python benchmarks/coreml_reference.py --shape 2048 2048 --bits 3
    python benchmarks/coreml_reference.py --shape 4096 4096 --bits 3 --out benchmarks/results/coreml_4096.json

The result is one JSON object in the benchmark's shape (plus extra diagnostic fields).
If coremltools is not installed, ``measure_coreml`` raises :class:`CoremlToolsUnavailable`
(or returns ``{"measured": false, "error": ...}`` with ``missing_ok=True``); the CLI prints that
error dict and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

CONFIG_NAME = "coremltools"
_MIB = 1 << 20


class CoremlToolsUnavailable(ImportError):
    """coremltools (needed for the reference measurement) is not importable."""


def coremltools_available() -> bool:
    """True when ``import coremltools`` can find the package (nothing is imported)."""
    return importlib.util.find_spec("coremltools") is not None


def _error_dict(message: str, **extra: Any) -> dict:
    return {"config": CONFIG_NAME, "ranks": 1, "measured": False, "error": message, **extra}


# --------------------------------------------------------------------------------------------
# Child side: runs in a fresh interpreter, writes one JSON object to the file given by --result.
# --------------------------------------------------------------------------------------------


def _read_status_kib(field: str) -> int | None:
    from edkm.bench.measure import proc_kib  # one /proc reader for the whole benchmark

    return proc_kib("/proc/self/status", field)


def _rss_bytes() -> int | None:
    kib = _read_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _peak_rss_bytes() -> int:
    kib = _read_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # bytes on macOS, KiB on Linux


class _SavedTensorCounter:
    """Pack hook that sums the distinct storages autograd saves for backward."""

    def __init__(self, exclude_ptrs: set[int]):
        self.exclude_ptrs = exclude_ptrs  # storages that exist anyway (parameters, input)
        self.seen: dict[tuple[int, int], str] = {}
        self.packs = 0
        self.excluded_bytes = 0
        self.by_dtype: dict[str, int] = {}

    def pack(self, t):
        self.packs += 1
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):  # e.g. sparse / wrapper tensors
            key = (id(t), t.numel() * t.element_size())
        if key not in self.seen:
            self.seen[key] = str(t.dtype)
            if key[0] in self.exclude_ptrs:
                self.excluded_bytes += key[1]
            else:
                self.by_dtype[str(t.dtype)] = self.by_dtype.get(str(t.dtype), 0) + key[1]
        return t

    @staticmethod
    def unpack(t):
        return t

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.seen)


def _build(args: dict):
    import torch
    import torch.nn as nn
    from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

    dtype = getattr(torch, args["dtype"])
    out_f, in_f = args["shape"]
    torch.manual_seed(args["seed"])
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False, dtype=dtype))
    layer_cfg = {
        "n_bits": args["bits"],
        "granularity": "per_tensor",
        "weight_threshold": 0,  # palettize whatever the size (default 2048 would skip tiny layers)
    }
    layer_cfg.update(args["options"])
    config = DKMPalettizerConfig.from_dict({"module_name_configs": {"0": layer_cfg}})
    palettizer = DKMPalettizer(model, config)
    model = palettizer.prepare()
    x = torch.randn(args["batch"], in_f, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return model, palettizer, x


def _child(args: dict) -> dict:
    import coremltools
    import torch
    from coremltools.optimize.torch.palettization import _efficient_kmeans

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    model, palettizer, x = _build(args)
    fq = model[0].weight_fake_quant
    weight = model[0].weight

    if args["phase"] == "steady":
        centroids = torch.load(args["centroids"]) if args.get("centroids") else None
        if centroids is None:
            # No step-1 centroids: evenly spaced ones (same cost per DKM iteration; the number of
            # iterations run before the inertia early-exit may differ from a real step 2).
            w = weight.detach()
            centroids = torch.linspace(w.min().item(), w.max().item(), 2 ** args["bits"])
            centroids = centroids.to(w.dtype).view(-1, 1)
        fq.centroids = [centroids]  # what init_partitions leaves behind after step 1

    # Count the DKM iterations actually run (x_c_dist is called once per iteration).
    calls = {"x_c_dist": 0}
    orig_x_c_dist = _efficient_kmeans._EfficientKMeans.x_c_dist

    def counting_x_c_dist(params, clusters):
        if torch.is_grad_enabled():  # the differentiable iterations, not the no-grad k-means init
            calls["x_c_dist"] += 1
        return orig_x_c_dist(params, clusters)

    _efficient_kmeans._EfficientKMeans.x_c_dist = staticmethod(counting_x_c_dist)

    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude.add(x.untyped_storage().data_ptr())
    counter = _SavedTensorCounter(exclude)

    def step(count: bool) -> tuple[float, float, float]:
        c0 = time.process_time()
        t0 = time.perf_counter()
        if count:
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                y = model(x)
        else:
            y = model(x)
        t1 = time.perf_counter()
        y.float().sum().backward()
        palettizer.step()
        t2 = time.perf_counter()
        c2 = time.process_time()
        del y
        weight.grad = None  # as optimizer.zero_grad(set_to_none=True) would
        return t1 - t0, t2 - t0, c2 - c0

    baseline_rss = _rss_bytes()
    warmup_s = None
    if args["phase"] == "steady":
        # Warm-up: the same steady-state step once, so that the timed one runs in a warm process
        # (as step 2 of a training run does); it has the same peak memory as the timed step.
        _, warmup_s, _ = step(count=False)
        calls["x_c_dist"] = 0
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    fwd_s, step_s, cpu_s = step(count=True)
    peak = _peak_rss_bytes()
    result: dict[str, Any] = {
        "phase": args["phase"],
        "warmup_step_seconds": warmup_s,
        "step_seconds": step_s,
        "step_cpu_seconds": cpu_s,
        "forward_seconds": fwd_s,
        "loadavg_1min": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline_rss,
        "saved_bytes": counter.total_bytes,
        "saved_bytes_new": counter.total_bytes - counter.excluded_bytes,
        "saved_bytes_params_and_input": counter.excluded_bytes,
        "saved_bytes_by_dtype": counter.by_dtype,
        "saved_tensor_packs": counter.packs,
        "saved_storages": len(counter.seen),
        "dkm_iterations": calls["x_c_dist"],
        "coremltools_version": coremltools.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "palett_max_mem": fq.palett_max_mem,
        "kmeans_init": args["options"].get("kmeans_init", "auto"),
        "centroids_dtype": str(fq.centroids[0].dtype),
    }
    if args["phase"] == "first":
        if args.get("centroids"):
            torch.save(fq.centroids[0].detach().clone(), args["centroids"])
        if args.get("second_step"):
            calls["x_c_dist"] = 0
            _, result["second_step_same_process_seconds"], _ = step(count=False)
            result["second_step_same_process_dkm_iterations"] = calls["x_c_dist"]
    return result


# --------------------------------------------------------------------------------------------
# Parent side.
# --------------------------------------------------------------------------------------------


def _run_child(args: dict, timeout: float | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="coreml_ref_") as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(args), "--result", result_path]
        env = dict(os.environ)
        env.setdefault("PYTHONWARNINGS", "ignore")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"coremltools {args['phase']} measurement timed out after {timeout} s") from err
        if proc.returncode != 0 or not os.path.exists(result_path):
            tail = (proc.stderr or proc.stdout or "")[-3000:]
            killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
            raise RuntimeError(
                f"coremltools {args['phase']} measurement failed with exit code {proc.returncode}{killed}:\n{tail}"
            )
        with open(result_path) as f:
            return json.load(f)


def measure_coreml(
    shape: tuple[int, int] = (4096, 4096),
    bits: int = 3,
    batch: int = 8,
    *,
    dtype: str = "bfloat16",
    first_step: bool = True,
    second_step_same_process: bool = True,
    kmeans_init: str | None = None,
    kmeans_n_init: int | None = None,
    kmeans_max_iter: int | None = None,
    threads: int | None = None,
    seed: int = 0,
    timeout: float | None = 3600.0,
    missing_ok: bool = False,
) -> dict:
    """Measure one coremltools DKM training step on a ``shape = (out_features, in_features)`` layer.

    Args:
        shape: weight shape ``(out_features, in_features)``.
        bits: palettization bits (``2**bits`` centroids, one per-tensor LUT).
        batch: rows of the random input ``(batch, in_features)``.
        dtype: weight / input dtype, ``"bfloat16"`` (default; coremltools runs DKM in the weight
            dtype) or ``"float32"``.
        first_step: also measure step 1 (k-means init + DKM fwd/bwd) in its own process and use its
            centroids for the steady-state step. If False, the steady step starts from evenly
            spaced centroids and ``first_step_seconds`` is None.
        second_step_same_process: in the step-1 process, also time step 2 (a cross-check of
            ``seconds``; does not affect the reported peak RSS).
        kmeans_init / kmeans_n_init: coremltools init options (defaults ``"auto"`` -> ``kmeans++``
            for > 1024 weights, and 10 restarts of up to 100 iterations). They only change how
            step 1 finds its starting centroids, not the cost of a DKM step. ``kmeans_n_init=1``
            cuts step 1 about 6x; ``kmeans_init="opt1d"`` is faster still but its step-1 peak RSS
            is ~2.4x the steady one (3.1 GB at 2048^2 bf16).
        kmeans_max_iter: DKM iterations per forward (coremltools default 3). This DOES change the
            steady-state step; leave None for the reference number.
        threads: ``torch.set_num_threads`` in the children (default: torch's default).
        timeout: seconds per child process.
        missing_ok: if coremltools is missing, return an error dict instead of raising.

    Returns:
        ``{"config": "coremltools", "ranks": 1, "measured": True, "footprint_bytes", "device_bytes",
        "host_bytes", "copied_bytes", "peak_rss_bytes", "seconds", "first_step_seconds",
        "coremltools_version", ...}`` plus diagnostics (see the module docstring).

    Raises:
        CoremlToolsUnavailable: coremltools is not installed (unless ``missing_ok``).
        RuntimeError: a measurement subprocess failed (its stderr tail is in the message).
    """
    if not coremltools_available():
        msg = (
            "coremltools is not installed; install the optional benchmark extra "
            "(pip install 'edkm[bench]' or pip install coremltools) to run the coremltools reference"
        )
        if missing_ok:
            return _error_dict(msg, shape=list(shape), bits=bits)
        raise CoremlToolsUnavailable(msg)
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be 'bfloat16', 'float32' or 'float16', got {dtype!r}")
    options: dict[str, Any] = {}
    if kmeans_init is not None:
        options["kmeans_init"] = kmeans_init
    if kmeans_n_init is not None:
        options["kmeans_n_init"] = int(kmeans_n_init)
    if kmeans_max_iter is not None:
        options["kmeans_max_iter"] = int(kmeans_max_iter)
    base = {
        "shape": [int(shape[0]), int(shape[1])],
        "bits": int(bits),
        "batch": int(batch),
        "dtype": dtype,
        "seed": int(seed),
        "options": options,
        "threads": threads,
    }

    first = None
    with tempfile.TemporaryDirectory(prefix="coreml_ref_centroids_") as tmp:
        centroids_path = os.path.join(tmp, "centroids.pt") if first_step else None
        if first_step:
            first = _run_child(
                {**base, "phase": "first", "centroids": centroids_path, "second_step": second_step_same_process},
                timeout,
            )
        steady = _run_child({**base, "phase": "steady", "centroids": centroids_path}, timeout)

    footprint = steady["saved_bytes"]
    out: dict[str, Any] = {
        "config": CONFIG_NAME,
        "ranks": 1,
        "measured": True,
        "footprint_bytes": footprint,
        "device_bytes": footprint,
        "host_bytes": 0,
        "copied_bytes": 0,
        "peak_rss_bytes": steady["peak_rss_bytes"],
        "seconds": steady["step_seconds"],
        "first_step_seconds": first["step_seconds"] if first else None,
        "coremltools_version": steady["coremltools_version"],
        "torch_version": steady["torch_version"],
        "shape": base["shape"],
        "bits": base["bits"],
        "batch": base["batch"],
        "dtype": dtype,
        "threads": steady["threads"],
        "options": options,
        "kmeans_init": steady["kmeans_init"],
        "dkm_iterations": steady["dkm_iterations"],
        "forward_seconds": steady["forward_seconds"],
        "steady_warmup_step_seconds": steady["warmup_step_seconds"],
        "cpu_seconds": steady["step_cpu_seconds"],
        "first_step_cpu_seconds": first["step_cpu_seconds"] if first else None,
        "loadavg_1min": {"steady": steady["loadavg_1min"], "first_step": first["loadavg_1min"] if first else None},
        "baseline_rss_bytes": steady["baseline_rss_bytes"],
        "rss_growth_bytes": steady["peak_rss_bytes"] - (steady["baseline_rss_bytes"] or 0),
        "saved_bytes_new": steady["saved_bytes_new"],
        "saved_bytes_params_and_input": steady["saved_bytes_params_and_input"],
        "saved_bytes_by_dtype": steady["saved_bytes_by_dtype"],
        "saved_storages": steady["saved_storages"],
        "first_step_peak_rss_bytes": first["peak_rss_bytes"] if first else None,
        "first_step_dkm_iterations": first["dkm_iterations"] if first else None,
        "second_step_same_process_seconds": (first or {}).get("second_step_same_process_seconds"),
        "note": (
            "footprint_bytes = distinct storages saved for backward by the palettized forward "
            "(saved_tensors_hooks pack counter; coremltools installs no hooks of its own at "
            f"palett_max_mem={steady['palett_max_mem']}), including the weight and input "
            "(saved_bytes_params_and_input). CPU only: device_bytes = footprint, nothing offloaded. "
            "seconds = steady-state fwd+bwd (fresh process, step-1 centroids installed, timed after one warm-up step "
            "of the same kind; peak_rss_bytes covers both); "
            "first_step_seconds includes coremltools' k-means init. cpu_seconds = process CPU time "
            "(all threads) of the step; wall seconds are inflated when loadavg exceeds the cores."
        ),
    }
    if steady["saved_tensor_packs"] == 0:  # someone else's hooks swallowed the packs
        out["footprint_bytes"] = out["device_bytes"] = out["rss_growth_bytes"]
        out["note"] += " No saved tensor was seen by the counter: footprint falls back to peak minus baseline RSS."
    if not first_step:
        out["note"] += " first_step=False: steady step started from evenly spaced centroids."
    return out


def _format_summary(r: dict) -> str:
    if not r.get("measured"):
        return f"coremltools reference not measured: {r.get('error')}"
    first = r["first_step_seconds"]
    return (
        f"coremltools {r['coremltools_version']} DKM {r['shape'][0]}x{r['shape'][1]} {r['bits']}-bit {r['dtype']}: "
        f"saved {r['footprint_bytes'] / _MIB:.0f} MiB, peak RSS {r['peak_rss_bytes'] / _MIB:.0f} MiB, "
        f"fwd+bwd {r['seconds']:.2f} s" + (f", first step {first:.1f} s" if first is not None else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("OUT", "IN"))
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--no-first-step", action="store_true", help="skip step 1 (k-means init)")
    p.add_argument("--kmeans-init", default=None, help="coremltools kmeans_init (default auto -> kmeans++)")
    p.add_argument("--kmeans-n-init", type=int, default=None, help="coremltools kmeans_n_init (default 10)")
    p.add_argument("--kmeans-max-iter", type=int, default=None, help="DKM iterations (default 3; changes the step)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child is not None:
        result = _child(json.loads(a.child))
        with open(a.result, "w") as f:
            json.dump(result, f)
        return 0

    try:
        result = measure_coreml(
            tuple(a.shape),
            a.bits,
            a.batch,
            dtype=a.dtype,
            first_step=not a.no_first_step,
            kmeans_init=a.kmeans_init,
            kmeans_n_init=a.kmeans_n_init,
            kmeans_max_iter=a.kmeans_max_iter,
            threads=a.threads,
            timeout=a.timeout,
            missing_ok=True,
        )
    except RuntimeError as e:
        result = _error_dict(str(e), shape=list(a.shape), bits=a.bits)
    text = json.dumps(result, indent=2)
    print(text)
    print(_format_summary(result), file=sys.stderr)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0 if result.get("measured") else 2


if __name__ == "__main__":
    sys.exit(main())
