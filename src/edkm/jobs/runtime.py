"""Thread setup and the description of where a job ran (for ``report.json``).

Intra-op threads only pay off when each operation is large enough to split. For the bundled
260 K-parameter model they do not: ``edkm compress --steps 20`` measured 2-10x slower with two
threads than one on a shared 2-core machine (README, "Speed"), because the threads fight each
other and every other process for the cores. So the default is one thread for models under
``SMALL_MODEL_PARAMS`` parameters, and for bigger ones the cores divided among the processes of
this machine (``LOCAL_WORLD_SIZE`` under torchrun). ``OMP_NUM_THREADS``, when set, always wins,
and ``--threads`` wins over everything.

Example:
    >>> pick_threads(260_000, env={}, cores=2)
    1
    >>> pick_threads(7_000_000_000, env={"LOCAL_WORLD_SIZE": "2"}, cores=16)
    8
    >>> pick_threads(7_000_000_000, env={"OMP_NUM_THREADS": "3"}, cores=16)
    3
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edkm import __version__
from edkm.models.gguf import resolve_gguf

SMALL_MODEL_BYTES = 64 << 20  # weight files below this: one intra-op thread (~16 M fp32 / 32 M 16-bit parameters)


def weight_bytes(model: str | os.PathLike) -> int:
    """Total size of the weight files (``*.safetensors``, ``*.bin``) in a checkpoint folder; a GGUF file's size."""
    gguf = resolve_gguf(model)
    if gguf is not None:
        return gguf.stat().st_size
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in Path(model).glob(pattern))


def pick_threads(
    model_bytes: int, requested: int | None = None, env: Mapping[str, str] | None = None, cores: int | None = None
) -> int:
    """Intra-op threads for a model of ``model_bytes`` of weights (rule in the module docstring)."""
    env = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    if model_bytes < SMALL_MODEL_BYTES:
        return 1
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, (cores or os.cpu_count() or 1) // local)


def configure_threads(model_dir: str | os.PathLike, requested: int | None = None) -> int:
    """Apply :func:`pick_threads` for the model in ``model_dir`` to torch in this (CLI) process."""
    threads = pick_threads(weight_bytes(model_dir), requested)
    torch.set_num_threads(threads)
    return threads


def run_environment(device: str = "cpu") -> dict[str, Any]:
    """Versions, UTC timestamp, host, CPU kernel level and thread/device setup of this process (for a report).

    Same seed + same environment gives bit-identical training (``tests/test_determinism.py``); another
    torch/transformers build or CPU instruction set changes float rounding slightly, which eDKM's final hard
    assignment can amplify to about the spread across seeds: reports record this so such runs can be told apart.
    """
    try:
        # deferred: transformers is the hf extra (optional here), and importing it is slow
        import transformers

        transformers_version: str | None = transformers.__version__
    except ImportError:  # pragma: no cover - the hf extra is optional
        transformers_version = None
    return {
        "edkm_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers_version,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python_version": platform.python_version(),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


__all__ = ["SMALL_MODEL_BYTES", "configure_threads", "pick_threads", "run_environment", "weight_bytes"]
