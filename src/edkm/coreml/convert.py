"""``export_coreml``: a finalized edkm model -> a Core ML ``.mlpackage`` holding our exact LUTs.

iOS 18: one ``constexpr_lut_to_dense`` per clustered tensor, b-bit indices, one LUT per group of output
channels. iOS 16: LUTs padded to 2/4/16/64/256 entries (3 bits -> 16 entries, 4-bit indices), one LUT
per tensor. ``kv_cache=True`` gives a stateful model: fp16 ``key_cache`` / ``value_cache`` states.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn

from edkm.coreml.layers import conversion_copy, mark_compressed
from edkm.coreml.trace import StatefulLM, StatelessLM, causal_mask


def import_coremltools() -> Any:
    """coremltools, or a RuntimeError saying how to install it."""
    try:
        # deferred: coremltools is the coreml extra, loaded only when exporting or verifying
        import coremltools
    except ImportError as err:
        raise RuntimeError(f"Core ML export needs coremltools: pip install 'edkm[coreml]' ({err})") from err
    return coremltools


SEARCH_ELEMENTS = 1 << 24  # weights x LUT entries compared at once by the sliced nearest-entry search


def sliced_index_search(search: Callable[..., np.ndarray], budget: int = SEARCH_ELEMENTS) -> Callable[..., np.ndarray]:
    """coremltools' ``find_indices_for_lut`` run on slices of the weight's first axis: the same indices, bounded memory.

    coremltools compares every weight with every LUT entry at once (weight.size x 2^b temporaries: 27 GiB for
    SmolLM2's 49,152 x 576 tied head at 8 bits) and takes no option to bound it; slicing along the output axis, in
    whole LUT groups, leaves each weight's nearest entry unchanged.

    >>> nearest = lambda w, lut, axis=None: abs(w[..., None] - lut.reshape(len(lut), 1, -1)).argmin(-1)
    >>> w, lut = np.array([[0.1, 0.9], [0.5, 0.1]]), np.array([0.1, 0.5, 0.9]).reshape(1, 1, 3, 1)
    >>> sliced_index_search(nearest, budget=1)(w, lut).tolist()  # one row at a time
    [[0, 2], [1, 0]]
    """

    def search_slices(data: np.ndarray, lut: np.ndarray, vector_axis: int | None = None) -> np.ndarray:
        if lut.shape[-1] > 1 or data.ndim == 0:  # vector LUTs: not ours, coremltools' own search
            return search(data, lut, vector_axis)
        grouped = lut.shape[0] > 1
        per_lut = data.shape[0] // lut.shape[0] if grouped else 1  # rows of axis 0 that share one LUT
        rows = -(-max(1, budget // max(1, data[0].size * lut.shape[-2])) // per_lut) * per_lut
        return np.concatenate(
            [
                search(data[r : r + rows], lut[r // per_lut : (r + rows) // per_lut] if grouped else lut, vector_axis)
                for r in range(0, data.shape[0], rows)
            ]
        )

    return search_slices


def _convert(traced: torch.jit.ScriptModule, ct: Any, target: str, inputs: list, states: list) -> Any:
    # deferred with coremltools: the module whose search the converter calls
    from coremltools.optimize import _utils as optimize_utils

    deployment = ct.target.iOS18 if target == "ios18" or states else ct.target.iOS16
    search = sliced_index_search(optimize_utils.find_indices_for_lut, SEARCH_ELEMENTS)
    with mock.patch.object(optimize_utils, "find_indices_for_lut", search):
        return ct.convert(
            traced,
            inputs=inputs,
            states=states or None,
            outputs=[ct.TensorType(name="logits")],
            minimum_deployment_target=deployment,
            convert_to="mlprogram",
            skip_model_load=True,
        )


def write_package(mlmodel: Any, path: Path) -> None:
    """Save ``mlmodel`` to ``path`` (.mlpackage folder) atomically: a reader sees the old package or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        mlmodel.save(str(tmp / path.name))
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # left by an interrupted earlier save
        if path.exists():
            os.replace(path, old)
        os.replace(tmp / path.name, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_coreml(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    target: str = "ios18",
    kv_cache: bool = False,
    length: int = 64,
) -> Path:
    """Convert a finalized Hugging Face causal LM (LUT layers) to ``path`` (.mlpackage); returns the path.

    Inputs: ``input_ids`` (int32, 1 x ``length``; with ``kv_cache``, 1 x 1..``length`` new tokens) and ``mask``
    (fp16 additive causal mask 1 x 1 x query x end, see :func:`edkm.coreml.trace.causal_mask`); output ``logits``.
    """
    ct = import_coremltools()
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ValueError(f"the Core ML output must end in .mlpackage, got {path.name!r}")
    if kv_cache and target != "ios18":
        raise ValueError("--kv-cache needs Core ML states, available from iOS 18: use --target ios18")
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and length > max_positions:
        raise ValueError(f"length {length} exceeds the model's {max_positions} positions")
    lm = conversion_copy(model, target)
    wrapper = mark_compressed(StatefulLM(lm, length) if kv_cache else StatelessLM(lm)).eval()
    ids = torch.zeros(1, length, dtype=torch.int32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values are expected
        traced = torch.jit.trace(wrapper, (ids, causal_mask(length, length)), check_trace=False)
    if kv_cache:
        query, end = ct.RangeDim(1, length), ct.RangeDim(1, length)
        inputs = [
            ct.TensorType("input_ids", shape=(1, query), dtype=ct.converters.mil.mil.types.int32),
            ct.TensorType("mask", shape=(1, 1, query, end), dtype=ct.converters.mil.mil.types.fp16),
        ]
        states = [
            ct.StateType(
                ct.TensorType(shape=tuple(getattr(wrapper, n).shape), dtype=ct.converters.mil.mil.types.fp16), name=n
            )
            for n in ("key_cache", "value_cache")
        ]
    else:
        inputs = [
            ct.TensorType("input_ids", shape=(1, length), dtype=ct.converters.mil.mil.types.int32),
            ct.TensorType("mask", shape=(1, 1, length, length), dtype=ct.converters.mil.mil.types.fp16),
        ]
        states = []
    write_package(_convert(traced, ct, target, inputs, states), path)
    return path
