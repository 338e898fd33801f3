"""Fine-tuning loop: AdamW, warmup + cosine schedule, gradient accumulation and clipping, tau
annealing, checkpoint / resume, and data parallelism with torch.distributed (DDP).

The global batch of step s is a fixed function of (seed, s), and each of N ranks takes every N-th
sequence of it, so a run on N processes follows the same loss curve as one process, and a resumed
run the same curve as an uninterrupted one.

Example:
    >>> import torch
    >>> from edkm.training.loop import TrainConfig, train
    >>> model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    >>> data = torch.randint(0, 16, (32, 9))
    >>> losses = train(lambda x, y: torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()),
    ...                model, data[:, :-1], data[:, 1:], TrainConfig(steps=3, batch_size=4, progress=False))
    >>> len(losses)
    3
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from edkm.atomic import atomic_path
from edkm.ranks import rank_world
from edkm.transform import anneal_


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # sequences per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    lr: float = 1e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    clip: float = 1.0  # max gradient norm (0 = off)
    seed: int = 0
    checkpoint_every: int = 50  # steps (0 = only at the end)
    progress: bool = True


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(step: int, n: int, cfg: TrainConfig) -> torch.Tensor:
    """Sequence indices of step ``step``'s global batch (epoch-wise permutations, seeded)."""
    per_epoch = n // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training sequences")
    epoch, slot = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    return perm[slot * cfg.batch_size : (slot + 1) * cfg.batch_size]


def clip_grad_norm_(params: Any, max_norm: float) -> float:
    """Scale the gradients so that their total 2-norm is at most ``max_norm``; returns the norm before.

    Plain tensors: ``torch.nn.utils.clip_grad_norm_``. Sharded (``Shard`` DTensor) gradients, as
    FSDP leaves them: the squares are summed in float64 over each local shard and all-reduced, so
    the clip factor does not depend on how the parameters are split over processes.
    """
    # deferred: torch.distributed.tensor takes ~0.8 s to import; only FSDP-sharded gradients need it
    from torch.distributed.tensor import DTensor, Shard

    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not any(isinstance(g, DTensor) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for g in grads:
        if not isinstance(g, DTensor) or not all(isinstance(p, Shard) for p in g.placements):
            raise ValueError("clip_grad_norm_: mixing sharded gradients with replicated ones is not supported")
        total += g.to_local().double().square().sum()
    dist.all_reduce(total, group=grads[0].device_mesh.get_group())
    norm = float(total.sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.to_local().mul_(coef)
    return norm


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, losses: list[float]) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "losses": losses,
        "rng": (torch.get_rng_state(), random.getstate()),
    }
    with atomic_path(path) as tmp:  # a crash leaves the previous checkpoint
        torch.save(state, tmp)


def train(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    checkpointer: Any = None,
) -> list[float]:
    """Train ``model`` in place; returns the loss of every step (mean over the global batch).

    ``on_step(steps_done, loss)`` is called on rank 0 after every step; with it, the loop shows no
    progress bar of its own (the caller reports progress).

    ``loss_fn(x, y)`` returns the summed token loss of a micro-batch divided by nothing: the loop
    normalises by the global number of target tokens (labels != -100), so ranks and micro-batches
    combine exactly. Under torch.distributed the caller passes the DDP-wrapped module's forward
    inside ``loss_fn``; ``model`` is the module whose parameters are optimised and checkpointed.
    ``checkpointer`` (e.g. :class:`edkm.distributed.DCPCheckpointer` under FSDP) replaces the rank-0
    ``torch.save`` checkpoint: its ``save(path, model, opt, step, losses)`` runs on every rank and
    ``load(path, model, opt)`` returns (step, losses).
    """
    rank, size = rank_world()
    if cfg.batch_size % (size * cfg.grad_accum):
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by world size {size} x grad_accum {cfg.grad_accum}"
        )
    opt = make_optimizer(model, cfg)
    path = Path(checkpoint) if checkpoint else None
    start, losses = restore(path, model, opt, checkpointer) if resume else (0, [])
    bar = None
    if cfg.progress and rank == 0 and on_step is None:
        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    model.train()
    tokens_seen, t0 = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        loss, n_tokens = train_step(loss_fn, model, opt, inputs, labels, cfg, step)
        losses.append(loss)
        tokens_seen += n_tokens
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens_seen / (time.perf_counter() - t0):.0f}")
            bar.update(1)
        if on_step is not None and rank == 0:
            on_step(step + 1, losses[-1])
        done = step + 1
        due = done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        if path is not None and (rank == 0 or checkpointer) and due:
            (checkpointer.save if checkpointer else _save_checkpoint)(path, model, opt, done, losses)
    if bar is not None:
        bar.close()
    return losses


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def restore(
    path: Path | None, model: nn.Module, opt: torch.optim.Optimizer, checkpointer: Any
) -> tuple[int, list[float]]:
    """(steps done, their losses) from the checkpoint at ``path``; model, optimizer and RNG state restored."""
    if checkpointer is not None:
        return checkpointer.load(path, model, opt)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:  # weights_only: tensors and plain containers, never arbitrary unpickling
        state = torch.load(path, weights_only=True)
    except Exception as err:
        raise ValueError(f"--resume: {path} is not a readable edkm checkpoint: {err}") from err
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"][0])
    random.setstate(state["rng"][1])
    return state["step"], state["losses"]


def train_step(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    step: int,
) -> tuple[float, int]:
    """One optimizer step over the global batch of ``step``; (its mean token loss, its target tokens)."""
    rank, size = rank_world()
    per_rank = cfg.batch_size // size
    device = next(model.parameters()).device  # batches go where the model is
    anneal_(model, step / max(1, cfg.steps - 1))  # tau along each clusterer's schedule (PalettizeConfig.tau_end)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    batch = batch_indices(step, len(inputs), cfg)
    n_tokens = (labels[batch] != -100).sum().item()  # over the global batch: ranks combine exactly
    total = torch.zeros((), dtype=torch.float64, device=device)
    for micro in batch[rank::size].split(per_rank // cfg.grad_accum):
        x, y = (t[micro].to(device, non_blocking=True) for t in (inputs, labels))
        loss = loss_fn(x, y) / n_tokens
        (loss * size).backward()  # DDP averages over ranks: undo it so the sum is exact
        total += loss.detach().double()
    if size > 1:
        dist.all_reduce(total)
    if cfg.clip > 0:
        clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(total), n_tokens
