"""One measurement in a fresh Python process, so that its peak RSS (``VmHWM``) is its own.

Parent side: :func:`make_spec` describes the measurement as a JSON-able dict, :func:`wait_for_memory`
waits until the shared machine has room, and :func:`launch` starts one interpreter per spec
(``python -m edkm.bench._child SPEC_JSON RESULT_PATH``; several at once for the ranks of a sharded
configuration, meeting at a gloo file rendezvous) and reads their results back.

Child side: :func:`measure_in_process` joins the gloo group when ``world > 1``, runs one tiny
warm-up step, then times each unit (projections measured as one graph): seeded bf16 weights,
centroids from :func:`edkm.kmeans1d`, one forward + backward of :func:`edkm.dkm` under
:func:`edkm.memory.track_saved`, which counts what autograd holds for backward.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from edkm.bench.configs import CONFIGS, PROJECTIONS, REPO_ROOT, BenchOptions, GiB, Log
from edkm.rss import peak_rss_bytes, proc_kib, rss_bytes


def _loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# ------------------------------------------------------------------------------------------------
# Child: measure in this process
# ------------------------------------------------------------------------------------------------


def make_projection(spec: dict, p: int) -> tuple[Any, Any]:
    """Seeded bf16 weights of projection ``p`` and the incoming gradient of its clustered weights."""
    # deferred: child-side torch; the parent (and the CLI parser) import this module without it
    import torch

    gen = torch.Generator().manual_seed(spec["seed"] * 1009 + p)
    w = (torch.randn(spec["shape"], generator=gen) * spec["std"]).to(torch.bfloat16)
    g = torch.randn(spec["shape"], generator=gen).to(torch.bfloat16)
    return w, g


def _dkm_inputs(w: Any, k: int, tau_rel: float) -> tuple[Any, float]:
    """Centroids (one LUT per tensor) and absolute tau of ``w``."""
    # deferred: child-side torch; the parent (and the CLI parser) import this module without it
    from edkm.cluster import kmeans1d
    from edkm.layers.dkm import tau_scale

    c = kmeans1d(w, k)  # (1, k)
    return c[0], tau_rel * float(tau_scale(c)[0])


def _warmup(spec: dict) -> None:
    """One tiny forward + backward of the same kind (lazy initialisation, first collectives)."""
    # deferred: child-side torch; the parent (and the CLI parser) import this module without it
    import torch

    from edkm.memory import dkm

    w = (torch.randn(64, 64, generator=torch.Generator().manual_seed(7)) * spec["std"]).bfloat16()
    c, tau = _dkm_inputs(w, 1 << spec["bits"], spec["tau"])
    w.requires_grad_()
    out, _ = dkm(w, c, tau=tau, iters=spec["iters"], memory=spec["memory"])
    out.float().sum().backward()


def _measure_unit(spec: dict, unit: list[int]) -> dict:
    """One forward + backward of the projections in ``unit`` (their DKMs share one graph)."""
    # deferred: child-side torch; the parent (and the CLI parser) import this module without it
    import torch

    from edkm.memory import dkm, track_saved

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
    if spec["world"] > 1:
        torch.distributed.barrier()  # every rank starts the timed step together
    load0 = _loadavg()
    c0, t0 = time.process_time(), time.perf_counter()
    with track_saved(save_on_cpu=spec["save_on_cpu"]) as stats:
        outs = [dkm(w, c, tau=tau, iters=spec["iters"], memory=spec["memory"])[0] for w, c, tau in zip(ws, cs, taus)]
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
    """Measure one configuration (one rank of it) in this process; ``spec`` from :func:`make_spec`."""
    # deferred: child-side torch; the parent (and the CLI parser) import this module without it
    import torch
    import torch.distributed as dist

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    world = spec["world"]
    rank = int(os.environ["RANK"]) if world > 1 else 0
    if world > 1:
        dist.init_process_group("gloo", init_method=spec["init_method"], rank=rank, world_size=world)
    baseline = rss_bytes()
    try:
        _warmup(spec)
        units = [_measure_unit(spec, unit) for unit in spec["units"]]
    finally:
        if world > 1:
            dist.destroy_process_group()
    return {
        "rank": rank,
        "world": world,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak_rss_bytes(),
        "units": units,
    }


# ------------------------------------------------------------------------------------------------
# Parent: describe, wait for memory, launch
# ------------------------------------------------------------------------------------------------


def make_spec(config: str, opts: BenchOptions, units: list[list[int]], world: int) -> dict:
    """What the child measures: ``config`` on the projection ``units``, as one of ``world`` ranks."""
    memory, save_on_cpu, _ = CONFIGS[config]
    threads = max(1, (os.cpu_count() or 1) // world) if world > 1 else opts.threads
    return {
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
    }


def wait_for_memory(need: int, log: Log, timeout: float = 900.0) -> None:
    """Wait (up to ``timeout`` s) until ``need`` bytes (+10 %) are available: the machine is shared."""
    deadline = time.monotonic() + timeout
    warned = False
    while True:
        kib = proc_kib("/proc/meminfo", "MemAvailable")
        avail = None if kib is None else kib * 1024
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


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child, with this checkout's ``src`` first on PYTHONPATH."""
    env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    if (REPO_ROOT / "src" / "edkm").is_dir():
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(extra)
    return env


def launch(specs: list[dict], envs: list[dict], timeout: float) -> list[dict]:
    """Start one fresh interpreter per spec, all at once; return their results in order.

    Specs with ``world > 1`` get a file rendezvous for gloo in the run's temporary folder.
    """
    with tempfile.TemporaryDirectory(prefix="edkm_bench_") as tmp:
        procs, paths = [], []
        for i, (spec, env) in enumerate(zip(specs, envs)):
            if spec["world"] > 1:
                spec["init_method"] = f"file://{tmp}/rendezvous"
            path = os.path.join(tmp, f"result{i}.json")
            paths.append(path)
            cmd = [sys.executable, "-m", "edkm.bench._child", json.dumps(spec), path]
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
                )
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
