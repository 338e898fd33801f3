"""coremltools' own post-training palettizers as peers: the like-for-like ones, they write our format (LUT + indices).

* :func:`coreml_kmeans_`: ``PostTrainingPalettizer``, k-means per tensor or per group of output channels;
* :func:`coreml_skm_`: ``SKMPalettizer``, sensitive k-means (SqueezeLLM's Fisher-weighted k-means), its
  sensitivities from the next-token loss on calibration sequences of the training split.

coremltools leaves each palettized weight on its LUT, so the result becomes our LUT layers without re-clustering
(:func:`lut_of_clustered`): the distinct values of each group of rows are its LUT, each weight's index is the position
of its value. The embedding / output layers get their configured bits (8 for eDKM's recipe) per tensor, from
coremltools too; a tied output layer is its embedding's weight, clustered once.

Example (a tiny model, coremltools installed):
    >>> import torch, edkm
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    >>> _ = coreml_kmeans_(model, edkm.PalettizeConfig(bits=2))
    >>> model[0].lut.lut.shape, model[0].lut.indices.shape  # one 4-entry LUT for the tensor
    (torch.Size([1, 4]), torch.Size([1, 128]))
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edkm.config import PalettizeConfig
from edkm.layers.base import rows_first_weight, set_submodule
from edkm.layers.lut import LUT_DTYPE, LUTModule, LUTWeight
from edkm.transform import weight_plans


def lut_of_clustered(weight: torch.Tensor, bits: int, group_rows: int | None = None) -> LUTWeight:
    """A weight whose every group of ``group_rows`` rows (None: the whole tensor) holds at most 2^bits distinct
    values, as a LUTWeight (fp16 LUT, padded with its last entry). Raises ValueError for a weight not clustered so.

    >>> w = torch.tensor([[0.5, -1.0], [-1.0, 2.0]])
    >>> lut = lut_of_clustered(w, 2)
    >>> lut.lut.tolist(), lut().tolist()
    ([[-1.0, 0.5, 2.0, 2.0]], [[0.5, -1.0], [-1.0, 2.0]])
    """
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    group_rows = group_rows or rows.shape[0]
    if rows.shape[0] % group_rows:
        raise ValueError(f"{group_rows} rows per LUT do not divide the {rows.shape[0]} rows of the weight")
    k, luts, indices = 1 << bits, [], []
    for group in rows.reshape(rows.shape[0] // group_rows, -1):
        values, inverse = torch.unique(group, sorted=True, return_inverse=True)
        if len(values) > k:
            raise ValueError(f"a group of {group_rows} rows holds {len(values)} distinct values, more than 2^{bits}")
        luts.append(torch.cat([values, values[-1:].expand(k - len(values))]))
        indices.append(inverse.to(torch.uint8))
    return LUTWeight(torch.stack(luts).to(LUT_DTYPE), torch.stack(indices), weight.shape, bits, weight.dtype)


def lut_rows(bits: int, out: int, rows: int | None) -> int | None:
    """Output channels per LUT of a ``bits``-bit layer with ``out`` of them: ``rows`` where it divides them (and is
    fewer), else None (one LUT per tensor, also for the embedding/head above 4 bits)."""
    return rows if rows is not None and bits <= 4 and out % rows == 0 and out > rows else None


def coreml_config(model: nn.Module, config: PalettizeConfig, rows: int | None) -> dict[str, Any]:
    """coremltools' config dict (``module_name_configs``) for the layers ``config`` targets: their bits, one LUT per
    tensor or per :func:`lut_rows` output channels."""
    names = {}
    for modules, spec in weight_plans(model, config):
        name, module = modules[0]  # a tied weight: clustered at its first name, the others share it
        group = lut_rows(spec.bits, rows_first_weight(module).shape[0], rows)
        names[name] = {
            "n_bits": spec.bits,
            "granularity": "per_grouped_channel" if group else "per_tensor",
            **({"group_size": group, "channel_axis": 0} if group else {}),
        }
    return {"module_name_configs": names}


def _to_lut_layers(model: nn.Module, compressed: nn.Module, config: PalettizeConfig, rows: int | None) -> nn.Module:
    """Our LUT layers over ``model``'s modules from the clustered weights of ``compressed`` (same names)."""
    for modules, spec in weight_plans(model, config):
        name, module = modules[0]
        weight = rows_first_weight(compressed.get_submodule(name))
        lut = lut_of_clustered(weight, spec.bits, lut_rows(spec.bits, weight.shape[0], rows))
        for tied_name, tied in modules:
            set_submodule(model, tied_name, LUTModule(tied, lut))
    return model


def _quiet_coremltools() -> None:
    logging.getLogger("coremltools").setLevel(logging.WARNING)  # one INFO line per layer otherwise


@torch.no_grad()
def coreml_kmeans_(model: nn.Module, config: PalettizeConfig, rows: int | None = None) -> nn.Module:
    """coremltools ``PostTrainingPalettizer`` k-means in place: one LUT per tensor, or per ``rows`` output channels."""
    # deferred: coremltools is the coreml extra, loaded only when its palettizers run
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    _quiet_coremltools()
    ptp = PostTrainingPalettizer(model, PostTrainingPalettizerConfig.from_dict(coreml_config(model, config, rows)))
    return _to_lut_layers(model, ptp.compress(inplace=False), config, rows)


def coreml_skm_(
    model: nn.Module, sequences: torch.Tensor, config: PalettizeConfig, rows: int | None = None
) -> nn.Module:
    """coremltools ``SKMPalettizer`` in place, its Fisher sensitivities from the next-token loss on ``sequences``.

    Layers at more than 4 bits (the 8-bit embedding / output layer) get coremltools' ``PostTrainingPalettizer``
    k-means instead: SKM's weighted k-means of SmolLM2's 28 M-weight embedding into 256 entries exhausts memory in the
    library (``std::bad_alloc`` with 24 GiB), and SqueezeLLM leaves those layers unquantized anyway.
    """
    # deferred: coremltools is the coreml extra, loaded only when its palettizers run
    from coremltools.optimize.torch.palettization import (
        PostTrainingPalettizer,
        PostTrainingPalettizerConfig,
        SKMPalettizer,
        SKMPalettizerConfig,
    )

    _quiet_coremltools()
    names = coreml_config(model, config, rows)["module_name_configs"]
    narrow = {n: c for n, c in names.items() if c["n_bits"] <= 4}
    settings = {"module_name_configs": narrow, "calibration_nsamples": len(sequences)}
    skm = SKMPalettizer(model, SKMPalettizerConfig.from_dict(settings))

    def loss(m: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
        logits = m(chunk[None, :-1]).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), chunk[1:])

    with torch.enable_grad():
        compressed = skm.compress(dataloader=list(sequences), loss_fn=loss, inplace=False)
    wide = {"module_name_configs": {n: c for n, c in names.items() if c["n_bits"] > 4}}
    if wide["module_name_configs"]:  # the 8-bit embedding/head: PostTrainingPalettizer (see the docstring)
        ptp = PostTrainingPalettizer(compressed, PostTrainingPalettizerConfig.from_dict(wide))
        compressed = ptp.compress(inplace=True)
    return _to_lut_layers(model, compressed, config, rows)


__all__ = ["coreml_kmeans_", "coreml_skm_", "lut_of_clustered", "coreml_config"]
