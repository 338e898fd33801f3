"""What ``edkm bench memory`` runs: the configuration table, its options, and what fits in memory.

A configuration is a memory spec for :func:`edkm.dkm`, whether torch's ``save_on_cpu`` is emulated,
and whether it is sharded over real gloo ranks (:data:`CONFIGS`). :class:`BenchOptions` holds every
knob; :func:`options_from_args` builds it from the CLI's namespace and :func:`command_line` writes
the command back. :func:`choose_units` picks, from a rough peak-memory estimate, whether a
configuration measures the whole block at once or one projection at a time (or cannot run at all).

    >>> from types import SimpleNamespace
    >>> opts = options_from_args(SimpleNamespace(shape=[64, 32], bits=2, out="r/m.json", no_coreml=True))
    >>> opts.k, opts.numel, "coremltools" in opts.configs
    (4, 2048, False)
    >>> command_line(opts)
    'edkm bench memory --shape 64 32 --bits 2 --no-coreml --out r/m.json'
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

MiB = 1 << 20
GiB = 1 << 30
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
REPO_ROOT = Path(__file__).resolve().parents[3]

Log = Callable[[str], None]

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
# docs/method.md §6 (paper, one LLaMA-7B attention layer, 3 bits): footprint of plain DKM / footprint of each
PAPER_RATIOS = {"M": 2.9, "M+S@8": 23.5, "M+U": 16.4, "M+U+S@8": 130.0}


@dataclass
class BenchOptions:
    """Every knob of the benchmark (CLI flags map one to one; see :func:`options_from_args`)."""

    shape: tuple[int, int] = (4096, 4096)
    bits: int = 3
    out: str | None = "runs/bench/memory.json"  # benchmarks/results/ (committed) only when --out says so
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
    kw = {f.name: getattr(args, f.name) for f in fields(BenchOptions) if getattr(args, f.name, None) is not None}
    if getattr(args, "no_coreml", False) or getattr(args, "skip_coreml", False):
        kw["coreml"] = False
    return BenchOptions(**kw)


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


# ------------------------------------------------------------------------------------------------
# What fits the memory limit
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
