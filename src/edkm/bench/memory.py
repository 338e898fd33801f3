"""``edkm bench memory``: what DKM holds for backward under each eDKM memory technique (docs/method.md §5).

The paper-sized case (the default) is one LLaMA-7B attention block: the q, k, v and o
projections, 4096 x 4096 each, bf16 weights, 3 bits (8 centroids), one LUT per tensor, centroids
from :func:`edkm.kmeans1d`, ``tau = 0.05 x`` the median squared gap between sorted centroids (the
trainer's relative tau, :func:`edkm.layers.dkm.tau_scale`), ``iters = 3`` centroid updates, then one
forward + backward with a random incoming gradient. The weights are synthetic (seeded Gaussian,
std 0.02, rounded to bf16): no LLaMA checkpoint is available here, and what is measured depends
on the shape, the dtype and the number of distinct 16-bit values, not on the model.

Configurations (:mod:`.configs`): ``plain`` DKM; ``save_on_cpu`` (plain DKM under torch's
``save_on_cpu``, emulated by ``track_saved(save_on_cpu=True)``); the eDKM techniques ``M``
(marshaling), ``M+U`` (+ uniquification), ``M+S`` and ``M+U+S`` (+ sharding, real processes: gloo,
one process per rank, 2 and 4 ranks by default, an 8-rank figure computed from the measured shards
and marked ``"measured": false``; :mod:`.distributed`); ``fused`` (DKM in the unique domain,
docs/method.md §4); and ``coremltools`` (``DKMPalettizer`` on one layer, multiplied by the number of projections;
:mod:`.coreml`).

Every configuration runs in a fresh Python process (one per rank; :mod:`.measure`), so its peak
RSS (``VmHWM``) is its own. A configuration whose whole block would not fit the memory limit (plain
DKM holds ~4.3 GB per 4096 x 4096 projection) measures the projections one at a time in that
process and adds them up (bytes and seconds sum; the peak RSS is the largest); ``mode`` says which.

Per result: ``device_bytes`` / ``host_bytes`` held for backward (one storage counted once; the
weights themselves, held by the model anyway, are not counted), ``footprint_bytes`` = their sum,
``copied_bytes`` moved device -> host, ``peak_rss_bytes``, ``seconds`` (forward + backward wall
time), and diagnostics. On a CPU-only machine the host *is* the device: the hooks count what a
device run would hold and copy, but nothing is really copied (as torch's own ``save_on_cpu`` does
on CPU), so peak RSS and seconds contain no transfer. Ratios, targets and notes (:mod:`.report`)
are computed from the rows; :mod:`.render` prints the table and writes the JSON and Markdown.

Library use (what the CLI calls; options missing from ``args`` take the defaults of
:class:`BenchOptions`)::

    from types import SimpleNamespace
    from edkm.bench import run_memory_benchmark
    result = run_memory_benchmark(SimpleNamespace(shape=[256, 256], bits=3, out="/tmp/m.json",
                                                  projections=1, ranks=[2], coreml=False))
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Any

from edkm.bench.configs import CONFIGS, BenchOptions, GiB, Log, command_line, options_from_args
from edkm.bench.coreml import measure_coremltools
from edkm.bench.distributed import measure_config, measure_sharded
from edkm.bench.render import format_table, write_outputs
from edkm.bench.report import error_row, log_row, summarize
from edkm.rss import proc_kib


def _machine() -> str:
    """One line about this machine: OS, CPU model, cores, RAM, GPU."""
    # deferred: building the CLI parser imports edkm.bench (this module), which must not load torch
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_kib = proc_kib("/proc/meminfo", "MemTotal")
    ram = f", {mem_kib * 1024 / GiB:.0f} GiB RAM" if mem_kib else ""
    gpu = ", CUDA available (not used: CPU run)" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores{ram}{gpu}"


def run(opts: BenchOptions, log: Log | None = None) -> dict:
    """Measure every configuration of ``opts`` (sequentially: one heavy measurement at a time)."""
    # deferred: building the CLI parser imports edkm.bench (this module), which must not load torch
    import torch

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows: list[dict] = []
    t0 = time.time()
    for config in opts.configs:
        if config == "coremltools":
            log("coremltools: measuring one layer (first step includes k-means init; minutes)...")
            rows.append(measure_coremltools(opts, log))
        elif CONFIGS[config][2]:  # sharded: logs its rows itself
            rows += measure_sharded(config, opts, log)
            continue
        else:
            log(f"{config}...")
            try:
                rows.append(measure_config(config, opts, 1, log))
            except RuntimeError as err:  # Skipped included
                rows.append(error_row(config, 1, str(err)))
        log_row(rows[-1], log)
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
        "case": "one LLaMA-7B attention block (q, k, v, o)"
        if tuple(opts.shape) == (4096, 4096) and opts.projections == 4
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


def run_memory_benchmark(args: Any) -> dict:
    """``edkm bench memory``: measure, print the table, write the JSON and the Markdown."""
    opts = options_from_args(args)
    result = run(opts, log=None if not opts.quiet else (lambda msg: None))
    print(format_table(result))
    out, md = write_outputs(result, opts)
    if out:
        print(f"\nwrote {out} and {md}")
    return result
