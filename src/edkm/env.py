"""What a result depends on besides the code and the seed: library versions, threads, CPU kernels.

Same seed + same environment gives bit-identical training (``tests/test_determinism.py``). A different
environment (another transformers or torch build, another CPU instruction set) changes float
rounding slightly; the fp control absorbs that (differences in the 4th digit of perplexity), but
eDKM's final hard assignment can flip weights that sit near a cluster boundary and amplify it to
about the spread across seeds. Reports record this so such differences can be told apart.

Example:
    >>> sorted(environment())[:3]
    ['cpu_capability', 'python', 'threads']
"""

from __future__ import annotations

import platform
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Versions of python / torch / transformers, torch's CPU kernel level and intra-op thread count."""
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:  # pragma: no cover - the hf extra is optional
        tf = None
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf,
    }
