"""Checkpoints and export under FSDP.

:class:`DCPCheckpointer` saves model + optimizer state as sharded checkpoints with
``torch.distributed.checkpoint`` (every rank writes its own shards into one folder; a new folder
replaces the previous one only once it is complete), and loads them back, also into a different
number of processes: DCP reshards the DTensors. :func:`save_fsdp_palettized` writes the same
packed file a single-process run writes, without gathering the fp32 clustered weights anywhere:
each rank hard-assigns its own rows and only the uint8 indices are gathered (the small
unclustered tensors, e.g. norms, are gathered one at a time).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from edkm.distributed.clustered import hard_assignment
from edkm.export import save_palettized
from edkm.layers.base import set_submodule
from edkm.layers.lut import LUTModule, LUTWeight
from edkm.ranks import is_distributed, rank_world
from edkm.transform import clustered_modules, forward_scopes, release_scopes


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


class DCPCheckpointer:
    """``train(..., checkpointer=DCPCheckpointer())``: sharded save / load of a training state.

    The checkpoint is a folder (``path``) of DCP files plus the loop's step, losses and RNG state.
    A run killed while saving leaves the previous complete folder (or its ``.old`` twin) in place.
    """

    def save(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, losses: list[float]) -> None:
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {
            "model": model_sd,
            "optimizer": opt_sd,
            "step": step,
            "losses": list(losses),
            "rng": (torch.get_rng_state(), random.getstate()),
        }
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        if rank_world()[0] == 0 and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        _barrier()
        if rank_world()[0] == 0:  # swap in the complete folder; `old` bridges the moment between the renames
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _barrier()

    @staticmethod
    def existing(path: Path) -> Path | None:
        """The complete checkpoint folder for ``path``, if any (the ``.old`` one after a kill mid-swap)."""
        for candidate in (path, path.with_name(path.name + ".old")):
            if (candidate / ".metadata").is_file():
                return candidate
        return None

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[float]]:
        found = self.existing(path)
        if found is None:
            raise FileNotFoundError(f"--resume: no complete sharded checkpoint at {path}")
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optimizer": opt_sd, "step": 0, "losses": [], "rng": None}
        try:
            dcp.load(state, checkpoint_id=str(found))
        except Exception as err:  # noqa: BLE001 - DCP raises CheckpointException with per-rank details
            raise RuntimeError(
                f"cannot load the sharded checkpoint {found} into this model/process count: {err}"
            ) from err
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        torch.set_rng_state(state["rng"][0])
        random.setstate(state["rng"][1])
        return int(state["step"]), list(state["losses"])


@torch.no_grad()
def finalize_fsdp_(model: nn.Module) -> nn.Module:
    """``edkm.finalize_`` for a model under FSDP; a collective, call it on every rank.

    Clustered weights become LUT modules from per-shard hard assignment (gathered uint8 indices);
    every other DTensor (norms, biases, unclustered layers) is gathered into a plain tensor, one at
    a time. The result holds plain tensors only, equal on every rank; use it for export, not for
    further FSDP training.
    """
    luts: dict[int, LUTWeight] = {}
    scopes = forward_scopes(model)
    for name, module in clustered_modules(model):
        cw = module.clusterer
        if id(cw) not in luts:
            idx, lut = hard_assignment(module)
            luts[id(cw)] = LUTWeight(lut, idx, cw.shape, cw.spec.bits, module.weight.dtype)
        set_submodule(model, name, LUTModule(module, luts[id(cw)]))
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                module._parameters[key] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
    release_scopes(scopes)
    return model


def save_fsdp_palettized(model: nn.Module, path: str | os.PathLike) -> None:
    """Finalize a model under FSDP (:func:`finalize_fsdp_`) and write the packed file from rank 0."""
    finalize_fsdp_(model)
    if rank_world()[0] == 0:
        save_palettized(model, path)
    _barrier()
