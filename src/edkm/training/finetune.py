"""Fine-tuning a causal LM on packed sequences: next-token cross-entropy mixed with distillation from a teacher.

The loss per token is ``(1 - distill) x CE + distill x KL(teacher || model)``; under torch.distributed the model
trains under DDP (or is sharded already, FSDP); checkpoints are written by :func:`edkm.training.loop.train`.

Example:
    >>> loss_label(0.0), loss_label(1.0)
    ('CE', 'KL(teacher||model)')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edkm.data.text import PackedDataset
from edkm.distributed import DCPCheckpointer
from edkm.ranks import rank_world
from edkm.training.loop import TrainConfig, train


def finetune(
    model: nn.Module,
    data: PackedDataset,
    cfg: TrainConfig,
    checkpoint: Path,
    resume: bool,
    teacher: nn.Module | None = None,
    distill: float = 0.0,
    bar: Any = None,
    fsdp: bool = False,
) -> list[float]:
    """Fine-tune on next-token cross-entropy, mixed with ``distill`` x KL(teacher || model) per token.

    ``bar``: a progress bar with ``update(n, **postfix)`` and ``done`` (:class:`edkm.jobs.progress.PhaseBar`).
    """
    net: nn.Module = model
    if rank_world()[1] > 1 and not fsdp:  # under FSDP the model is sharded already (fsdp_)
        device = next(model.parameters()).device
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
        )

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = net(x).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        if teacher is None or distill == 0:
            return loss
        with torch.no_grad():
            target = F.log_softmax(teacher(x).logits.float(), dim=-1)
        kl = (target.exp() * (target - F.log_softmax(logits, dim=-1))).sum(-1)
        return (1 - distill) * loss + distill * kl[y != -100].sum()

    inputs, targets = data.input_ids[:, :-1], data.labels[:, 1:]
    name = loss_label(distill if teacher is not None else 0.0)
    on_step = None if bar is None else lambda done, loss: bar.update(done - bar.done, **{name: f"{loss:.4f}"})
    if fsdp:  # sharded DCP checkpoints in a folder
        checkpointer = DCPCheckpointer()
        if resume and checkpointer.existing(checkpoint) is None and checkpoint.with_suffix(".pt").is_file():
            raise ValueError(
                f"--resume --fsdp: {checkpoint.with_suffix('.pt')} was written without --fsdp; resume without it"
            )
        return train(
            loss_fn,
            model,
            inputs,
            targets,
            cfg,
            checkpoint,
            resume and checkpointer.existing(checkpoint) is not None,
            on_step,
            checkpointer,
        )
    if resume and not checkpoint.is_file() and checkpoint.with_suffix(".dcp").exists():
        raise ValueError(
            f"--resume: {checkpoint.with_suffix('.dcp')} is a sharded (--fsdp) checkpoint; resume with --fsdp"
        )
    return train(loss_fn, model, inputs, targets, cfg, checkpoint, resume and checkpoint.is_file(), on_step)


def loss_label(distill: float) -> str:
    """What the training loss is, per token: cross-entropy, distillation KL or their mix.

    >>> loss_label(0.0), loss_label(1.0), loss_label(0.25)
    ('CE', 'KL(teacher||model)', '0.75 CE + 0.25 KL')
    """
    if distill == 0:
        return "CE"
    return "KL(teacher||model)" if distill == 1 else f"{1 - distill:g} CE + {distill:g} KL"
