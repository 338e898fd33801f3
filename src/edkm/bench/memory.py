"""``edkm bench memory``: what DKM holds for backward under each eDKM memory technique (SPEC §5).

The paper-sized case (the default) is one LLaMA-7B attention block: the q, k, v and o
projections, 4096 x 4096 each, bf16 weights, 3 bits (8 centroids), one LUT per tensor, centroids
from :func:`edkm.kmeans1d`, ``tau = 0.05 x`` the median squared gap between sorted centroids (the
trainer's relative tau, :func:`edkm.wrap.tau_scale`), ``iters = 3`` centroid updates, then one
forward + backward with a random incoming gradient. The weights are synthetic (seeded Gaussian,
std 0.02, rounded to bf16): no LLaMA checkpoint is available here, and what is measured depends
on the shape, the dtype and the number of distinct 16-bit values, not on the model.

Configurations: ``plain`` DKM; ``save_on_cpu`` (plain DKM under torch's ``save_on_cpu``, emulated
by ``track_saved(save_on_cpu=True)``); the eDKM techniques ``M`` (marshaling), ``M+U``
(+ uniquification), ``M+S`` and ``M+U+S`` (+ sharding, real processes: gloo, one process per
rank, 2 and 4 ranks by default, an 8-rank figure computed from the measured shards and marked
``"measured": false``); ``fused`` (DKM in the unique domain, SPEC §4); and ``coremltools``
(``DKMPalettizer``, via ``benchmarks/coreml_reference.py``'s ``measure_coreml`` on one layer,
multiplied by the number of projections).

Every configuration runs in a fresh Python process (one per rank), so its peak RSS (``VmHWM``)
is its own. A configuration whose whole block would not fit the memory limit (plain DKM holds
~4.3 GB per 4096 x 4096 projection) measures the projections one at a time in that process and
adds them up (bytes and seconds sum; the peak RSS is the largest); ``mode`` says which.

Per result: ``device_bytes`` / ``host_bytes`` held for backward (one storage counted once; the
weights themselves, held by the model anyway, are not counted), ``footprint_bytes`` = their sum,
``copied_bytes`` moved device -> host, ``peak_rss_bytes``, ``seconds`` (forward + backward wall
time), and diagnostics. On a CPU-only machine the host *is* the device: the hooks count what a
device run would hold and copy, but nothing is really copied (as torch's own ``save_on_cpu`` does
on CPU), so peak RSS and seconds contain no transfer.

Library use (what the CLI calls; options missing from ``args`` take the defaults of
:class:`BenchOptions`)::

    from argparse import Namespace
    from edkm.bench import run_memory_benchmark
    result = run_memory_benchmark(Namespace(shape=[256, 256], bits=3, out="/tmp/m.json",
                                            projections=1, ranks=[2], coreml=False))
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

# config name -> (memory spec for edkm.dkm, emulate save_on_cpu, sharded)
CONFIGS: dict[str, tuple[str, bool, bool]] = {
    "plain": ("plain", False, False),
    "save_on_cpu": ("plain", True, False),
    "M": ("marshal", False, False),
    "M+U": ("marshal+unique", False, False),
    "M+S": ("marshal+shard", False, True),
    "M+U+S": ("marshal+unique+shard", False, True),
    "fused": ("fused", False, False),
}
ORDER = (*CONFIGS, "coremltools")
# SPEC §6 (paper, one LLaMA-7B attention layer, 3 bits): footprint of plain DKM / footprint of each
PAPER_RATIOS = {"M": 2.9, "M+S@8": 23.5, "M+U": 16.4, "M+U+S@8": 130.0}

REPO_ROOT = Path(__file__).resolve().parents[3]
COREML_SCRIPT = REPO_ROOT / "benchmarks" / "coreml_reference.py"


@dataclass
class BenchOptions:
    """Every knob of the benchmark (CLI flags map one to one; see :func:`options_from_args`)."""

    shape: tuple[int, int] = (4096, 4096)
    bits: int = 3
    out: str | None = "benchmarks/results/memory.json"
    md: str | None = None  # default: ``out`` with the suffix .md
    iters: int = 3
    projections: int = 4
    ranks: list[int] = field(default_factory=lambda: [2, 4])
    extrapolate_ranks: list[int] = field(default_factory=lambda: [8])
    configs: list[str] = field(default_factory=lambda: list(ORDER))
    coreml: bool = True
    tau: float = 0.05  # relative: x the median squared gap between sorted centroids
    std: float = 0.02  # of the synthetic Gaussian weights
    seed: int = 0
    memory_limit_gib: float = 12.0  # all processes of one measurement together
    per_projection: bool = False  # force one projection at a time for every config
    isolate: bool = True  # fresh process per configuration (False: in this process; tests only)
    threads: int | None = None  # torch threads of a single-process run (default: all cores)
    timeout: float = 3600.0  # seconds per measurement process
    quiet: bool = False

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.ranks = sorted({int(r) for r in self.ranks})
        self.extrapolate_ranks = sorted({int(r) for r in self.extrapolate_ranks})
        if isinstance(self.configs, str):
            self.configs = [c.strip() for c in self.configs.split(",") if c.strip()]
        unknown = [c for c in self.configs if c not in ORDER]
        if unknown:
            raise ValueError(f"unknown benchmark config(s) {unknown}; valid: {', '.join(ORDER)}")
        if not self.coreml and "coremltools" in self.configs:
            self.configs = [c for c in self.configs if c != "coremltools"]
        if self.bits < 1 or self.iters < 0 or self.projections < 1 or any(r < 2 for r in self.ranks):
            raise ValueError(f"need bits >= 1, iters >= 0, projections >= 1, ranks >= 2: {self}")

    @property
    def k(self) -> int:
        return 1 << self.bits

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def options_from_args(args: Any) -> BenchOptions:
    """:class:`BenchOptions` from an argparse namespace; missing attributes keep their defaults."""
    kw = {}
    for f in fields(BenchOptions):
        value = getattr(args, f.name, None)
        if value is not None:
            kw[f.name] = value
    if getattr(args, "no_coreml", False) or getattr(args, "skip_coreml", False):
        kw["coreml"] = False
    return BenchOptions(**kw)


# ------------------------------------------------------------------------------------------------
# Measurement (runs in the child process, or in-process when isolate=False)
# ------------------------------------------------------------------------------------------------


def _status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru if sys.platform == "darwin" else ru * 1024
    return kib * 1024


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def make_projection(spec: dict, p: int):
    """Seeded bf16 weights of projection ``p`` and the incoming gradient of its clustered weights."""
    import torch

    gen = torch.Generator().manual_seed(spec["seed"] * 1009 + p)
    w = (torch.randn(spec["shape"], generator=gen) * spec["std"]).to(torch.bfloat16)
    g = torch.randn(spec["shape"], generator=gen).to(torch.bfloat16)
    return w, g


def _dkm_inputs(w, k: int, tau_rel: float):
    import edkm
    from edkm.wrap import tau_scale

    c = edkm.kmeans1d(w, k)  # (1, k): one LUT per tensor
    return c[0], tau_rel * float(tau_scale(c)[0])


def _warmup(spec: dict) -> None:
    """One tiny forward + backward of the same kind (lazy initialisation, first collectives)."""
    import torch

    import edkm

    w = (torch.randn(64, 64, generator=torch.Generator().manual_seed(7)) * spec["std"]).bfloat16()
    c, tau = _dkm_inputs(w, 1 << spec["bits"], spec["tau"])
    w.requires_grad_()
    out, _ = edkm.dkm(w, c, tau=tau, iters=spec["iters"], memory=spec["memory"])
    out.float().sum().backward()


def _measure_unit(spec: dict, unit: list[int]) -> dict:
    """One forward + backward of the projections in ``unit`` (their DKMs share one graph)."""
    import torch

    import edkm
    from edkm.memory import track_saved

    dist = None
    if spec.get("world", 1) > 1:
        import torch.distributed as dist
    k = 1 << spec["bits"]
    t_init = time.perf_counter()
    ws, gs, cs, taus = [], [], [], []
    for p in unit:
        w, g = make_projection(spec, p)
        c, tau = _dkm_inputs(w, k, spec["tau"])
        ws.append(w.requires_grad_())
        gs.append(g)
        cs.append(c)
        taus.append(tau)
    init_s = time.perf_counter() - t_init
    gc.collect()
    if dist is not None:
        dist.barrier()  # every rank starts the timed step together
    load0 = _loadavg()
    c0, t0 = time.process_time(), time.perf_counter()
    with track_saved(save_on_cpu=spec["save_on_cpu"]) as stats:
        outs = [
            edkm.dkm(w, c, tau=tau, iters=spec["iters"], memory=spec["memory"])[0] for w, c, tau in zip(ws, cs, taus)
        ]
    t1 = time.perf_counter()
    torch.autograd.backward(outs, gs)
    t2, c2 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        checks = {
            "finite": all(bool(torch.isfinite(w.grad).all()) for w in ws),
            "out_sum": [float(o.double().sum()) for o in outs],
            "grad_sum": [float(w.grad.double().sum()) for w in ws],
            "grad_abs_sum": [float(w.grad.double().abs().sum()) for w in ws],
        }
    del outs, ws, gs
    gc.collect()
    return {
        "projections": [PROJECTIONS[p] if p < len(PROJECTIONS) else f"proj{p}" for p in unit],
        **stats.as_dict(),
        "seconds": t2 - t0,
        "forward_seconds": t1 - t0,
        "cpu_seconds": c2 - c0,
        "init_seconds": init_s,
        "loadavg_1min": [load0, _loadavg()],
        "taus": taus,
        **checks,
    }


def measure_in_process(spec: dict) -> dict:
    """Measure one configuration (one rank of it) in this process; see :func:`_spec`."""
    import torch

    dist = None
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec.get("world", 1) > 1:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=spec["init_method"], rank=int(os.environ["RANK"]), world_size=spec["world"]
        )
    baseline = rss_bytes()
    try:
        if spec.get("warmup", True):
            _warmup(spec)
        units = [_measure_unit(spec, unit) for unit in spec["units"]]
    finally:
        if dist is not None:
            dist.destroy_process_group()
    return {
        "rank": int(os.environ.get("RANK", 0)) if dist is not None else 0,
        "world": spec.get("world", 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak_rss_bytes(),
        "units": units,
    }


# ------------------------------------------------------------------------------------------------
# Launching (parent)
# ------------------------------------------------------------------------------------------------


def estimate_peak_bytes(config: str, opts: BenchOptions, per_unit: int, ranks: int = 1) -> int:
    """Rough peak memory of all processes of one measurement running ``per_unit`` projections at once.

    Only used to choose whole-block vs one-projection-at-a-time, to skip what cannot fit the memory
    limit and to wait for free memory; the numbers reported are measured. Calibrated on 2048 x 2048
    runs (each within 10 % above the measured VmHWM): ``m`` is one |W| x |C| fp32 map; plain DKM
    saves two per soft assignment (``iters + 1`` of them) and peaks ~4 maps above what it holds;
    with U, backward rebuilds full maps (~7 alive); with S alone, ~6 (gathered maps).
    """
    memory, _, sharded = CONFIGS[config]
    n = opts.numel
    m = n * opts.k * 4
    saved_maps = 2 * (opts.iters + 1) * m + opts.iters * n * 4
    if config == "fused":
        held, transient = 0, 48 * n
    elif "unique" in memory:
        held, transient = 3 * n, 7 * m
    elif sharded:
        held, transient = saved_maps // ranks, 6 * m
    else:
        held, transient = saved_maps, 4 * m
    process = 300 * MiB + 4 * n * per_unit  # interpreter + torch, weights and gradients
    return ranks * (process + per_unit * held + transient)


def coreml_estimate_bytes(opts: BenchOptions) -> int:
    """coremltools' peak for one layer: ~20 |W| x |C| fp32 maps (10.9 GB measured at 4096^2, 3 bits)."""
    return 21 * opts.numel * opts.k * 4 + GiB


class Skipped(RuntimeError):
    """A measurement that cannot fit the memory limit (not run)."""


def choose_units(config: str, opts: BenchOptions, ranks: int = 1) -> tuple[str, list[list[int]]]:
    """("block", [[0..P-1]]) when the whole block fits the memory limit, else one projection per unit.

    Raises :class:`Skipped` when even one projection at a time does not fit.
    """
    every = list(range(opts.projections))
    limit = opts.memory_limit_gib * GiB
    if opts.projections > 1 and not opts.per_projection:
        if estimate_peak_bytes(config, opts, opts.projections, ranks) <= limit:
            return "block", [every]
    need = estimate_peak_bytes(config, opts, 1, ranks)
    if need > limit:
        who = f"{ranks} ranks x " if ranks > 1 else ""
        raise Skipped(
            f"not measured: {who}one {opts.shape[0]}x{opts.shape[1]} projection needs ~{need / GiB:.1f} GiB "
            f"(estimated from the peak RSS of smaller runs), over the {opts.memory_limit_gib:g} GiB memory limit "
            "(--memory-limit-gib) of this shared machine"
        )
    return ("block" if opts.projections == 1 else "per_projection"), [[p] for p in every]


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def wait_for_memory(need: int, log, timeout: float = 900.0) -> None:
    """Wait (up to ``timeout`` s) until ``need`` bytes (+10 %) are available: the machine is shared."""
    deadline = time.monotonic() + timeout
    warned = False
    while True:
        avail = mem_available_bytes()
        if avail is None or avail >= need * 1.1:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"not enough free memory: need ~{need / GiB:.1f} GiB, {avail / GiB:.1f} GiB available after "
                f"waiting {timeout:.0f} s (the machine is shared; rerun later or lower --memory-limit-gib)"
            )
        if not warned:
            log(f"  waiting for memory: need ~{need / GiB:.1f} GiB, {avail / GiB:.1f} GiB available")
            warned = True
        time.sleep(10)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    if (REPO_ROOT / "src" / "edkm").is_dir():
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _run_processes(specs: list[dict], envs: list[dict], timeout: float) -> list[dict]:
    """Start one fresh interpreter per spec, all at once; return their results in order."""
    with tempfile.TemporaryDirectory(prefix="edkm_bench_") as tmp:
        procs, paths = [], []
        for i, (spec, env) in enumerate(zip(specs, envs)):
            if "init_method" in spec and spec["init_method"] is None:
                spec["init_method"] = f"file://{tmp}/rendezvous"
            path = os.path.join(tmp, f"result{i}.json")
            paths.append(path)
            cmd = [sys.executable, "-m", "edkm.bench._child", json.dumps(spec), path]
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            )
        outputs, deadline = [], time.monotonic() + timeout
        try:
            for p in procs:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                outputs.append(out or "")
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            raise RuntimeError(f"measurement timed out after {timeout:.0f} s") from None
        finally:
            for p in procs:  # one rank failed: the others would wait in a collective forever
                if p.poll() is None:
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
        results = []
        for p, path, out in zip(procs, paths, outputs):
            if p.returncode != 0 or not os.path.exists(path):
                killed = " (killed: out of memory?)" if p.returncode in (-9, 137) else ""
                raise RuntimeError(f"measurement process failed with exit code {p.returncode}{killed}:\n{out[-3000:]}")
            with open(path) as f:
                results.append(json.load(f))
        return results


def _spec(config: str, opts: BenchOptions, units: list[list[int]], world: int) -> dict:
    memory, save_on_cpu, _ = CONFIGS[config]
    cores = os.cpu_count() or 1
    threads = max(1, cores // world) if world > 1 else opts.threads
    spec = {
        "config": config,
        "memory": memory,
        "save_on_cpu": save_on_cpu,
        "shape": list(opts.shape),
        "bits": opts.bits,
        "iters": opts.iters,
        "tau": opts.tau,
        "std": opts.std,
        "seed": opts.seed,
        "units": units,
        "threads": threads,
        "world": world,
        "warmup": True,
    }
    if world > 1:
        spec["init_method"] = None  # a rendezvous file, filled in at launch
    return spec


def measure_config(config: str, opts: BenchOptions, ranks: int = 1, log=print) -> dict:
    """Run one configuration (at ``ranks`` processes when sharded) and return its result row."""
    mode, units = choose_units(config, opts, ranks)
    need = estimate_peak_bytes(config, opts, len(units[0]), ranks)
    spec = _spec(config, opts, units, ranks)
    if ranks > 1:
        wait_for_memory(need, log)
        envs = []
        for r in range(ranks):
            env = _child_env()
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks))
            env.update(OMP_NUM_THREADS=str(spec["threads"]))
            envs.append(env)
        per_rank = _run_processes([dict(spec) for _ in range(ranks)], envs, opts.timeout)
    elif opts.isolate:
        wait_for_memory(need, log)
        per_rank = _run_processes([spec], [_child_env()], opts.timeout)
    else:
        per_rank = [measure_in_process(spec)]
    row = _aggregate(config, ranks, per_rank)
    row.update(mode=mode, isolated=opts.isolate or ranks > 1, estimated_peak_bytes=need)
    return row


_SUM = ("footprint", "device_bytes", "host_bytes", "copied_bytes", "saved", "stored", "referenced")


def _sum_units(res: dict) -> dict:
    tot: dict[str, Any] = {k: sum(u[k] for u in res["units"]) for k in _SUM}
    for key in ("seconds", "forward_seconds", "cpu_seconds", "init_seconds"):
        tot[key] = sum(u[key] for u in res["units"])
    kinds: dict[str, int] = {}
    for u in res["units"]:
        for k, v in u["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    tot["kinds"] = kinds
    return tot


def _aggregate(config: str, ranks: int, per_rank: list[dict]) -> dict:
    sums = [_sum_units(r) for r in per_rank]
    worst = max(range(len(sums)), key=lambda i: sums[i]["footprint"])
    s = sums[worst]
    units = per_rank[0]["units"]
    row: dict[str, Any] = {
        "config": config,
        "ranks": ranks,
        "measured": True,
        "footprint_bytes": s["footprint"],
        "device_bytes": s["device_bytes"],
        "host_bytes": s["host_bytes"],
        "copied_bytes": s["copied_bytes"],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in per_rank),
        "seconds": max(x["seconds"] for x in sums),
        "forward_seconds": max(x["forward_seconds"] for x in sums),
        "cpu_seconds": max(x["cpu_seconds"] for x in sums),
        "kinds": s["kinds"],
        "saved_tensors": s["saved"],
        "stored_storages": s["stored"],
        "referenced": s["referenced"],
        "threads": per_rank[0]["threads"],
        "baseline_rss_bytes": max(r["baseline_rss_bytes"] or 0 for r in per_rank),
        "units": [u["projections"] for u in units],
        "unit_seconds": [u["seconds"] for u in units],
        "unit_peak_note": "peak_rss_bytes is the process's VmHWM over all units (the largest)",
        "kmeans_init_seconds": s["init_seconds"],
        "loadavg_1min": [u["loadavg_1min"] for u in units],
        "finite_gradients": all(u["finite"] for r in per_rank for u in r["units"]),
        "out_sum": [x for u in units for x in u["out_sum"]],
        "grad_sum": [x for u in units for x in u["grad_sum"]],
        "grad_abs_sum": [x for u in units for x in u["grad_abs_sum"]],
        "torch": per_rank[0]["torch"],
    }
    if ranks > 1:
        row["per_rank"] = [
            {
                "rank": r["rank"],
                "footprint_bytes": x["footprint"],
                "host_bytes": x["host_bytes"],
                "device_bytes": x["device_bytes"],
                "copied_bytes": x["copied_bytes"],
                "kinds": x["kinds"],
                "peak_rss_bytes": r["peak_rss_bytes"],
                "seconds": x["seconds"],
            }
            for r, x in zip(per_rank, sums)
        ]
        row["total_peak_rss_bytes"] = sum(r["peak_rss_bytes"] for r in per_rank)
        row["ranks_identical_gradients"] = all(
            [u["grad_sum"] for u in r["units"]] == [u["grad_sum"] for u in units] for r in per_rank
        )
    return row


def extrapolate(row: dict, to_ranks: int, opts: BenchOptions) -> dict:
    """Per-rank figures of a sharded config at ``to_ranks`` from a measured row (``measured: false``).

    Only the sharded part depends on the rank count: U's index list (kind "index") with U, each
    per-weight saved map (kind "shard") without U. Rank r keeps ceil(L / N) elements of a length-L
    tensor; everything else (distinct rows, centroids, ...) is the same on every rank.
    """
    n_from = row["ranks"]
    kind = "index" if "U" in row["config"] else "shard"
    part = row["kinds"].get(kind, 0)
    if kind == "index":  # one index of numel elements per projection
        per = -(-opts.numel // n_from)
        elem = part / (opts.projections * per)
        new_part = int(round(opts.projections * -(-opts.numel // to_ranks) * elem))
        how = (
            f"measured at {n_from} ranks minus its index shards ({part} B = {opts.projections} x ceil({opts.numel}/"
            f"{n_from}) x {elem:g} B) plus {opts.projections} x ceil({opts.numel}/{to_ranks}) x {elem:g} B"
        )
    else:  # many maps of lengths that are multiples of numel
        new_part = int(round(part * n_from / to_ranks))
        exact = opts.numel % (n_from * to_ranks) == 0
        how = (
            f"measured at {n_from} ranks with its map shards ({part} B) scaled by {n_from}/{to_ranks}"
            + (" (exact: every sharded length is a multiple of both rank counts)" if exact else " (ignores padding)")
        )
    delta = new_part - part
    out = {
        "config": row["config"],
        "ranks": to_ranks,
        "measured": False,
        "footprint_bytes": row["footprint_bytes"] + delta,
        "device_bytes": row["device_bytes"] + (delta if row["device_bytes"] >= part and row["host_bytes"] == 0 else 0),
        "host_bytes": row["host_bytes"] + (delta if row["host_bytes"] >= part else 0),
        "copied_bytes": row["copied_bytes"] + (delta if row["copied_bytes"] >= part else 0),
        "peak_rss_bytes": None,
        "seconds": None,
        "kinds": {**row["kinds"], kind: new_part},
        "computed_from": f"{row['config']}@{n_from}",
        "how": "computed, not measured: " + how,
        "mode": f"computed from {row['config']}@{n_from}",
    }
    return out


# ------------------------------------------------------------------------------------------------
# coremltools reference
# ------------------------------------------------------------------------------------------------


def load_coreml_reference():
    """The ``benchmarks/coreml_reference.py`` module, or None when the file is missing."""
    path = COREML_SCRIPT if COREML_SCRIPT.is_file() else Path.cwd() / "benchmarks" / "coreml_reference.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("coreml_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def measure_coremltools(opts: BenchOptions, log=print) -> dict:
    """coremltools DKMPalettizer on one layer of ``shape``, multiplied by the projection count."""
    ref = load_coreml_reference()
    if ref is None:
        return {"config": "coremltools", "ranks": 1, "measured": False, "error": f"{COREML_SCRIPT} not found"}
    p = opts.projections
    need = coreml_estimate_bytes(opts)
    if need > opts.memory_limit_gib * GiB:
        return {"config": "coremltools", "ranks": 1, "measured": False, "error": (
            f"not measured: one layer needs ~{need / GiB:.1f} GiB, over the {opts.memory_limit_gib:g} GiB memory limit")}
    wait_for_memory(need, log)
    try:
        r = ref.measure_coreml(tuple(opts.shape), opts.bits, dtype="bfloat16", timeout=opts.timeout, missing_ok=True)
    except RuntimeError as err:
        return {"config": "coremltools", "ranks": 1, "measured": False, "error": str(err)}
    if not r.get("measured"):
        return {**r, "config": "coremltools", "ranks": 1, "measured": False}
    fp = r.get("saved_bytes_new", r["footprint_bytes"]) * p  # leaf weight and input not counted, as ours
    first = r.get("first_step_seconds")
    return {
        "config": "coremltools",
        "ranks": 1,
        "measured": True,
        "footprint_bytes": fp,
        "device_bytes": fp,
        "host_bytes": 0,
        "copied_bytes": 0,
        "peak_rss_bytes": r["peak_rss_bytes"],
        "seconds": r["seconds"] * p,
        "first_step_seconds": first * p if first is not None else None,
        "cpu_seconds": r["cpu_seconds"] * p if r.get("cpu_seconds") is not None else None,
        "loadavg_1min": r.get("loadavg_1min"),
        "mode": f"one {opts.shape[0]}x{opts.shape[1]} layer measured, x{p} for the block",
        "coremltools_version": r.get("coremltools_version"),
        "layer": r,
    }


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def row_key(row: dict) -> str:
    return row["config"] if row["ranks"] == 1 else f"{row['config']}@{row['ranks']}"


def compute_ratios(rows: list[dict]) -> dict[str, float]:
    """Footprint of plain DKM / footprint of each row (key ``config`` or ``config@ranks``)."""
    plain = next((r for r in rows if r["config"] == "plain" and r.get("footprint_bytes")), None)
    if plain is None:
        return {}
    return {
        row_key(r): plain["footprint_bytes"] / r["footprint_bytes"]
        for r in rows
        if r.get("footprint_bytes") and r["config"] != "plain"
    }


def offload_ratio(iters: int, k: int) -> float:
    """Expected save_on_cpu / M footprint of plain DKM with ``k`` centroids and ``iters`` updates.

    Per soft assignment autograd saves the distances D (for the square's backward), the attentions A
    twice (softmax's output, and A in A * x resp. A * C), and in each centroid update the (n, 1)
    fp32 weight column x. save_on_cpu copies every one of them: 3 (iters + 1) maps + iters columns;
    M stores each storage once: 2 (iters + 1) maps + one column (none when iters = 0; a map is k columns).
    """
    return (3 * (iters + 1) * k + iters) / (2 * (iters + 1) * k + min(iters, 1))


def check_targets(rows: list[dict], ratios: dict[str, float], opts: BenchOptions | None = None) -> dict[str, dict]:
    """The brief's targets, each with the measured value and whether it is met (None: not measured)."""
    by = {row_key(r): r for r in rows}

    def ratio_target(key: str, target: float) -> dict:
        v = ratios.get(key)
        return {"value": v, "target": target, "met": None if v is None else v >= target}

    out = {
        "M+U footprint >= 16.4x smaller than plain": ratio_target("M+U", 16.4),
        "M+U+S at 8 ranks >= 130x smaller than plain": ratio_target("M+U+S@8", 130.0),
        "fused footprint >= 1000x smaller than plain": ratio_target("fused", 1000.0),
    }
    plain, fused, m, soc = by.get("plain"), by.get("fused"), by.get("M"), by.get("save_on_cpu")
    out["fused faster than plain (forward+backward)"] = {
        "value": None if not (plain and fused) else plain["seconds"] / fused["seconds"],
        "target": 1.0,
        "met": None if not (plain and fused) else fused["seconds"] < plain["seconds"],
        "unit": "plain seconds / fused seconds",
    }
    if m and plain:
        out["M stores every distinct storage once (M footprint == plain's distinct saved storages)"] = {
            "value": m["footprint_bytes"] / plain["footprint_bytes"],
            "target": 1.0,
            "met": m["footprint_bytes"] <= plain["footprint_bytes"] and m["referenced"] > 0,
            "unit": "M footprint / plain footprint",
        }
    if m and soc:
        out["M vs save_on_cpu (copies every saved tensor)"] = {
            "value": soc["footprint_bytes"] / m["footprint_bytes"],
            "target": None,
            "met": soc["footprint_bytes"] > m["footprint_bytes"],
            "unit": "save_on_cpu footprint / M footprint"
            + (f"; copied bytes {soc['copied_bytes'] / m['copied_bytes']:.2f}x" if m["copied_bytes"] else ""),
        }
        if opts is not None:
            out["M vs save_on_cpu (copies every saved tensor)"].update(
                expected=offload_ratio(opts.iters, opts.k), why=" ".join(offload_ratio.__doc__.split("\n\n")[1].split()))
    for key, paper in PAPER_RATIOS.items():
        v = ratios.get(key)
        out[f"paper: {key} {paper}x"] = {"value": v, "target": paper, "met": None if v is None else v >= paper}
    return out


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / MiB:,.1f}" if v < 100 * MiB else f"{v / MiB:,.0f}"


def _fmt_ratio(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}x" if v >= 100 else f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def mean_load(row: dict) -> float | None:
    """Mean 1-minute load average sampled before and after each timed step of a row."""
    samples = row.get("loadavg_1min")
    if isinstance(samples, dict):  # coremltools: {"steady": [before, after], ...}
        samples = [samples.get("steady") or []]
    flat = [x for pair in samples or [] for x in (pair or []) if x is not None]
    return sum(flat) / len(flat) if flat else None


def table_rows(result: dict) -> list[list[str]]:
    ratios = result.get("ratios", {})
    rows = []
    for r in result["results"]:
        key = row_key(r)
        if not r.get("measured") and r.get("error"):
            rows.append([r["config"], str(r["ranks"]), "error", *["-"] * (len(HEADER) - 3)])
            continue
        ranks = f"{r['ranks']}" + ("" if r.get("measured", True) else " (computed)")
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.2f}"
        cpu = "-" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.1f}"
        load = mean_load(r)
        ratio = "1x" if r["config"] == "plain" else _fmt_ratio(ratios.get(key))
        rows.append([
            r["config"], ranks, _mib(r["footprint_bytes"]), _mib(r["device_bytes"]), _mib(r["host_bytes"]),
            _mib(r["copied_bytes"]), _mib(r.get("peak_rss_bytes")), secs, cpu, "-" if load is None else f"{load:.1f}",
            ratio, r.get("mode", "-") or "-",
        ])
    return rows


HEADER = ["config", "ranks", "footprint MiB", "device MiB", "host MiB", "copied MiB", "peak RSS MiB",
          "seconds", "CPU s", "load", "vs plain", "mode"]
_LEFT = (0, 1, 11)


def format_table(result: dict) -> str:
    """Plain-text table (what ``edkm bench memory`` prints)."""
    rows = [HEADER, *table_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.ljust(w) if i in _LEFT else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    rows = table_rows(result)
    align = ["---:" if i not in _LEFT else "---" for i in range(len(HEADER))]
    lines = [
        "# DKM memory benchmark (`edkm bench memory`)",
        "",
        f"Produced by: `{result['command']}`",
        "",
        f"- case: {result['projections']} x {result['shape'][0]} x {result['shape'][1]} bf16 weights "
        f"({result['case']}), {result['bits']} bits, per-tensor LUT, iters={result['iters']}, "
        f"tau = {result['tau_relative']} x median squared centroid gap",
        f"- machine: {result['machine']}",
        f"- torch {result['torch']}; {result['date']}",
        "",
        "| " + " | ".join(HEADER) + " |",
        "| " + " | ".join(align) + " |",
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        "MiB = 2^20 bytes. `vs plain` = footprint of plain DKM / footprint of the row. `seconds` = forward + backward "
        "wall time, `CPU s` = process CPU time of it (all threads), `load` = mean 1-minute load average of the "
        "machine while it ran (2 cores, shared). Sharded rows are per rank; `(computed)` rows are not measured.",
        "",
        "## Targets",
        "",
        "| check | value | target | met |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, t in result.get("targets", {}).items():
        v = t.get("value")
        val = "-" if v is None else f"{v:,.2f}" if v < 1000 else f"{v:,.0f}"
        target = "-" if t.get("target") is None else f"{t['target']:g}"
        met = {True: "yes", False: "NO", None: "not measured"}[t.get("met")]
        lines.append(f"| {name} | {val} | {target} | {met} |")
    lines += ["", "## Notes", "", *[f"- {n}" for n in result.get("notes", [])], ""]
    return "\n".join(lines)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    ram = f", {mem / GiB:.0f} GiB RAM" if mem else ""
    gpu = ", CUDA available (not used: CPU run)" if _cuda() else ", no GPU"
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores{ram}{gpu}"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def command_line(opts: BenchOptions) -> str:
    """The ``edkm bench memory`` command that reproduces ``opts``."""
    d = BenchOptions()
    parts = ["edkm", "bench", "memory"]
    if tuple(opts.shape) != d.shape:
        parts += ["--shape", str(opts.shape[0]), str(opts.shape[1])]
    if opts.bits != d.bits:
        parts += ["--bits", str(opts.bits)]
    if opts.iters != d.iters:
        parts += ["--iters", str(opts.iters)]
    if opts.projections != d.projections:
        parts += ["--projections", str(opts.projections)]
    if opts.ranks != d.ranks:
        parts += ["--ranks", *map(str, opts.ranks)]
    if opts.configs != d.configs and set(opts.configs) != set(d.configs) - {"coremltools"}:
        parts += ["--configs", ",".join(opts.configs)]
    if not opts.coreml:
        parts += ["--no-coreml"]
    if opts.per_projection:
        parts += ["--per-projection"]
    if opts.memory_limit_gib != d.memory_limit_gib:
        parts += ["--memory-limit-gib", f"{opts.memory_limit_gib:g}"]
    if opts.out != d.out:
        parts += ["--out", str(opts.out)]
    return " ".join(shlex.quote(p) for p in parts)


def notes(opts: BenchOptions, rows: list[dict]) -> list[str]:
    out = [
        "Each configuration ran in a fresh Python process (one per rank); peak RSS is that process's VmHWM "
        "(for sharded rows the largest rank; all ranks share this machine, `total_peak_rss_bytes` in the JSON).",
        "CPU-only run: the host is the device. M/save_on_cpu count what a GPU run would hold on the host and copy "
        "device->host (`copied`), but nothing is physically copied (as torch's save_on_cpu does on CPU), so peak RSS "
        "and seconds contain no transfer.",
        "Footprint = bytes autograd holds for backward, each storage counted once; the weights (leaf tensors the model "
        "holds anyway) are not counted. plain counts what autograd saves; save_on_cpu counts every saved tensor as a "
        "separate copy, as torch.autograd.graph.save_on_cpu makes.",
        "Weights are synthetic: seeded Gaussian, std "
        f"{opts.std}, rounded to bf16 (no LLaMA checkpoint here); identical across configurations "
        "(out_sum/grad_sum in the JSON: M/U/S rows equal plain bit for bit, fused to float tolerance).",
        "seconds = forward + backward wall time of the DKM (k-means init excluded, one tiny warm-up step first). The "
        "machine is shared with other jobs (loadavg_1min in the JSON), so seconds are noisy; cpu_seconds is also "
        "recorded. Sharded ranks share the 2 cores (threads per rank = cores / ranks).",
    ]
    per = [row_key(r) for r in rows if r.get("measured") and r.get("mode") == "per_projection"]
    block = [row_key(r) for r in rows if r.get("measured") and r.get("mode") == "block" and r["config"] != "coremltools"]
    if per:
        out.append(
            f"The whole block does not fit the {opts.memory_limit_gib:g} GiB limit for {', '.join(per)}: those measured "
            f"the {opts.projections} projections one at a time in their process and added them (footprints, copies and "
            "seconds sum; peak RSS is the largest). "
            + (f"{', '.join(block)} ran the whole block as one forward + backward." if block else "")
        )
    if any(not r.get("measured", True) and not r.get("error") for r in rows):
        out.append(
            "Rows marked (computed) / \"measured\": false are derived from the measured per-rank shards: only the "
            "sharded part (U's index with U, the saved maps without U) scales as 1/N, the rest is per rank."
        )
    by = {row_key(r): r for r in rows}
    for r in rows:
        if r.get("skipped_measurement"):
            base = by.get(r["computed_from"], {})
            seen = ""
            if base.get("peak_rss_bytes"):
                seen = (f" (measured: {r['computed_from']} peaked at {base['peak_rss_bytes'] / GiB:.1f} GiB per rank, "
                        f"{base.get('total_peak_rss_bytes', 0) / GiB:.1f} GiB for its {base['ranks']} ranks)")
            out.append(f"{row_key(r)}: {r['skipped_measurement']}{seen}; its row is computed from {r['computed_from']}.")
    m, soc, mu = by.get("M"), by.get("save_on_cpu"), by.get("M+U")
    if m and soc and by.get("plain") and m.get("footprint_bytes") and soc.get("footprint_bytes"):
        out.append(
            f"M vs save_on_cpu: {soc['footprint_bytes'] / m['footprint_bytes']:.3f}x (expected "
            f"{offload_ratio(opts.iters, opts.k):.3f}x). "
            + " ".join(offload_ratio.__doc__.split("\n\n")[1].split())
            + f" M equals plain's distinct saved storages ({m['footprint_bytes'] / by['plain']['footprint_bytes']:.4f}x"
            f" of plain; {m.get('referenced')} saves answered by reference): M moves the footprint off the device, it "
            "does not shrink it."
        )
    if mu and mu.get("kinds"):
        rows_b, index_b = mu["kinds"].get("rows", 0), mu["kinds"].get("index", 0)
        per_row = (2 * (opts.iters + 1) * opts.k + 1) * 4
        out.append(
            f"M+U holds {index_b / MiB:,.1f} MiB of index ({index_b / (opts.numel * opts.projections):g} B per weight) "
            f"and {rows_b / MiB:,.1f} MiB of distinct rows (~{rows_b / per_row / opts.projections:,.0f} distinct bf16 "
            "values per projection): the index dominates, which is what S shards."
        )
    coreml = next((r for r in rows if r["config"] == "coremltools"), None)
    if coreml and coreml.get("measured"):
        lay = coreml["layer"]
        out.append(
            f"coremltools {coreml.get('coremltools_version')} DKMPalettizer: one {opts.shape[0]}x{opts.shape[1]} layer "
            f"measured (benchmarks/coreml_reference.py measure_coreml, batch {lay.get('batch')}, "
            f"{lay.get('dkm_iterations')} DKM iterations, steady-state step), footprint and seconds x{opts.projections} "
            f"for the block, peak RSS of the one layer; first step with k-means init "
            f"{lay.get('first_step_seconds'):.0f} s per layer. Footprint excludes its weight and input "
            f"(saved_bytes_new), as ours. It runs DKM in the weight dtype (bf16 maps), ours in fp32 (SPEC §2). "
            f"SPEC §6 lists ~10.9 GB peak RSS and ~390 s first step for this layer from an earlier measurement; this "
            f"run measured {coreml['peak_rss_bytes'] / GiB:.1f} GiB and {lay.get('first_step_seconds'):.0f} s."
        )
    elif coreml:
        out.append(f"coremltools not measured: {coreml.get('error')}")
    return out


def _log_row(row: dict, log) -> None:
    if row.get("measured"):
        log(f"  {row_key(row)}: footprint {row['footprint_bytes'] / MiB:,.1f} MiB, peak RSS "
            f"{row['peak_rss_bytes'] / MiB:,.0f} MiB, {row['seconds']:.2f} s")
    elif row.get("error"):
        log(f"  {row_key(row)}: ERROR {row['error'][:500]}")


def run(opts: BenchOptions, log=None) -> dict:
    """Measure every configuration of ``opts`` (sequentially: one heavy measurement at a time)."""
    import torch

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows: list[dict] = []
    t0 = time.time()
    for config in opts.configs:
        if config == "coremltools":
            log("coremltools: measuring one layer (first step includes k-means init; minutes)...")
            rows.append(measure_coremltools(opts, log))
        elif CONFIGS[config][2]:
            measured, skipped = [], {}
            for n in opts.ranks:
                log(f"{config} at {n} ranks...")
                try:
                    row = measure_config(config, opts, n, log)
                except Skipped as err:
                    skipped[n] = str(err)
                    log(f"  {config}@{n}: {err}")
                    continue
                except RuntimeError as err:
                    row = {"config": config, "ranks": n, "measured": False, "error": str(err)}
                rows.append(row)
                _log_row(row, log)
                if row.get("measured"):
                    measured.append(row)
            if not measured:
                rows += [{"config": config, "ranks": n, "measured": False, "error": why} for n, why in skipped.items()]
                continue
            base = max(measured, key=lambda r: r["ranks"])
            for n in sorted({*skipped, *opts.extrapolate_ranks} - {r["ranks"] for r in measured}):
                row = extrapolate(base, n, opts)
                if n in skipped:
                    row["skipped_measurement"] = skipped[n]
                rows.append(row)
            if len(measured) > 1:  # the model checked against the other measured rank count
                lo = min(measured, key=lambda r: r["ranks"])
                pred = extrapolate(base, lo["ranks"], opts)["footprint_bytes"]
                base["model_check"] = {
                    "predicted_footprint_at": lo["ranks"],
                    "predicted": pred,
                    "measured": lo["footprint_bytes"],
                    "relative_error": (pred - lo["footprint_bytes"]) / lo["footprint_bytes"],
                }
        else:
            log(f"{config}...")
            try:
                rows.append(measure_config(config, opts, 1, log))
            except RuntimeError as err:  # Skipped included
                rows.append({"config": config, "ranks": 1, "measured": False, "error": str(err)})
        if not CONFIGS.get(config, ("", False, False))[2]:
            _log_row(rows[-1], log)
    result: dict[str, Any] = {
        "shape": list(opts.shape),
        "bits": opts.bits,
        "projections": opts.projections,
        "iters": opts.iters,
        "results": rows,
        "ratios": {},
        "machine": _machine(),
        "torch": torch.__version__,
        "note": "",
        "case": "one LLaMA-7B attention block (q, k, v, o)" if tuple(opts.shape) == (4096, 4096) and opts.projections == 4
        else f"{opts.projections} projection(s)",
        "tau_relative": opts.tau,
        "weights": f"synthetic Gaussian std {opts.std} -> bf16, seed {opts.seed}",
        "command": command_line(opts),
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "wall_seconds": time.time() - t0,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
    }
    return summarize(result, opts)


def summarize(result: dict, opts: BenchOptions) -> dict:
    """(Re)compute the derived parts of a result from its rows: ratios, targets and notes."""
    rows = result["results"]
    result["ratios"] = compute_ratios(rows)
    result["targets"] = check_targets(rows, result["ratios"], opts)
    result["notes"] = notes(opts, rows)
    result["note"] = " ".join(result["notes"])
    return result


def write_outputs(result: dict, opts: BenchOptions) -> tuple[Path | None, Path | None]:
    if not opts.out:
        return None, None
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    md = Path(opts.md) if opts.md else out.with_suffix(".md")
    md.write_text(format_markdown(result))
    return out, md


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


def run_memory_benchmark(args: Any) -> dict:
    """``edkm bench memory``: measure, print the table, write the JSON and the Markdown."""
    opts = options_from_args(args)
    result = run(opts, log=None if not opts.quiet else (lambda msg: None))
    print(format_table(result))
    out, md = write_outputs(result, opts)
    if out:
        print(f"\nwrote {out} and {md}")
    return result
