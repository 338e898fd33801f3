"""`edkm compress`: the user's whole job on one model.

load -> baselines (RTN, post-training k-means) -> fine-tune with eDKM (and, as the fair control,
without clustering) -> finalize -> save packed -> reload -> evaluate -> ``report.json``.
Every perplexity is measured on the same held-out text with the same context. Under ``torchrun``
every rank trains (DDP, gloo on CPU / nccl on GPU); rank 0 evaluates and writes.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .baselines import ptq_kmeans_, rtn_
from .config import PalettizeConfig
from .distributed import DCPCheckpointer, FSDPOptions, finalize_fsdp_, fsdp_
from .data import PackedDataset, check_seq_len, load_alpaca, load_text, split_records, split_text, tokenize_alpaca, tokenize_text
from .eval.perplexity import perplexity
from .export import load_palettized, save_palettized
from .models import BUNDLED_TEXT, load_causal_lm
from .train import TrainConfig, train, world
from .wrap import finalize_, palettize_

MODEL_FILE = "model.edkm.safetensors"


@dataclass
class CompressConfig:
    model: str | None = None  # local HF checkpoint folder; None = bundled stories260K
    text: str | None = None  # plain-text training file; None = bundled TinyStories (unless alpaca)
    alpaca: str | None = None  # Alpaca JSON instead of text
    holdout: float = 0.2  # held-out fraction (text: last fraction by characters; alpaca: last records)
    context: int = 256
    out: str = "runs/default"
    plan: PalettizeConfig = field(default_factory=PalettizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp_control: bool = True  # also fine-tune without clustering for the same steps
    control_lr: float | None = 5e-4  # peak lr of the fp control (None = train.lr); its best measured, see README
    distill: float = 1.0  # weight of KL(teacher || model) in the eDKM loss (0 = plain cross-entropy)
    resume: bool = False
    fsdp: FSDPOptions | None = None  # shard the eDKM fine-tuning with FSDP2 (under torchrun)


def _data(cfg: CompressConfig, tokenizer: Any) -> tuple[PackedDataset, torch.Tensor]:
    """Training sequences of context+1 tokens and the held-out token stream."""
    if cfg.alpaca:
        train_recs, held_recs = split_records(load_alpaca(cfg.alpaca), cfg.holdout)
        train_set = PackedDataset.from_examples(tokenize_alpaca(tokenizer, train_recs), cfg.context + 1, "the training records")
        held = torch.cat([e.input_ids for e in tokenize_alpaca(tokenizer, held_recs)])
        return train_set, held
    train_text, held_text = split_text(load_text(cfg.text or BUNDLED_TEXT), cfg.holdout)
    train_set = PackedDataset.from_tokens(tokenize_text(tokenizer, train_text), cfg.context + 1, "the training text")
    return train_set, tokenize_text(tokenizer, held_text)


def _finetune(
    model: nn.Module, data: PackedDataset, cfg: TrainConfig, checkpoint: Path, resume: bool,
    teacher: nn.Module | None = None, distill: float = 0.0, fsdp: bool = False,
) -> list[float]:
    """Fine-tune on next-token cross-entropy, mixed with ``distill`` x KL(teacher || model) per token."""
    net: nn.Module = model
    if world()[1] > 1 and not fsdp:  # under FSDP the model is sharded already (fsdp_)
        net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)

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
    if fsdp:  # sharded DCP checkpoints in a folder
        checkpointer = DCPCheckpointer()
        if resume and checkpointer.existing(checkpoint) is None and checkpoint.with_suffix(".pt").is_file():
            raise ValueError(f"--resume --fsdp: {checkpoint.with_suffix('.pt')} was written without --fsdp; resume without it")
        return train(loss_fn, model, inputs, targets, cfg, checkpoint, resume and checkpointer.existing(checkpoint) is not None,
                     checkpointer)
    if resume and not checkpoint.is_file() and checkpoint.with_suffix(".dcp").exists():
        raise ValueError(f"--resume: {checkpoint.with_suffix('.dcp')} is a sharded (--fsdp) checkpoint; resume with --fsdp")
    return train(loss_fn, model, inputs, targets, cfg, checkpoint, resume and checkpoint.is_file())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # atomic: a killed run never leaves half a JSON


def _file_size(model: nn.Module, path: Path) -> int:
    save_palettized(model, path)
    return path.stat().st_size


def generate_text(model: nn.Module, tokenizer: Any, prompt: str = "", max_new_tokens: int = 80, **sampling: Any) -> str:
    """Decode a continuation of ``prompt`` (greedy unless ``do_sample=True`` with temperature/top_p)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids if prompt else torch.tensor([[tokenizer.bos_token_id]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def compress(cfg: CompressConfig) -> dict[str, Any]:
    """Run the whole job; returns the report (also written to ``<out>/report.json`` by rank 0)."""
    rank, size = world()
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / "progress.json"
    done: dict[str, Any] = json.loads(progress_path.read_text()) if cfg.resume and progress_path.is_file() else {}

    def record(**values: Any) -> None:
        done.update(values)
        if rank == 0:
            _write_json(progress_path, done)

    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_causal_lm(cfg.model)
    check_seq_len(cfg.context, model.config)
    data, held = _data(cfg, tokenizer)
    ppl = lambda m: perplexity(m, held, context=cfg.context)  # noqa: E731
    bits = cfg.plan.bits
    fp_bytes = sum(p.numel() * 2 for p in {id(p): p for p in model.parameters()}.values())

    if rank == 0 and "rtn_ppl" not in done:
        fp_ppl = ppl(model)
        rtn = rtn_(copy.deepcopy(model), cfg.plan)
        km = ptq_kmeans_(copy.deepcopy(model), cfg.plan)
        record(fp_ppl=fp_ppl, rtn_ppl=ppl(rtn), rtn_size_bytes=_file_size(rtn, out / "rtn.edkm.safetensors"),
               kmeans_ptq_ppl=ppl(km), kmeans_ptq_size_bytes=_file_size(km, out / "kmeans.edkm.safetensors"))
        del rtn, km
    teacher: nn.Module | None = None
    if cfg.fp_control:
        teacher = copy.deepcopy(model)  # trained here, or reloaded from its final checkpoint on --resume
        control = replace(cfg.train, lr=cfg.control_lr or cfg.train.lr)
        fp_losses = _finetune(teacher, data, control, out / "checkpoint_fp.pt", cfg.resume)
        if "fp_finetuned_ppl" not in done:
            record(fp_finetuned_ppl=ppl(teacher) if rank == 0 else None, fp_losses=fp_losses)
    # distillation teacher: the fine-tuned control when there is one, else the original model
    teacher = (teacher or copy.deepcopy(model)).eval().requires_grad_(False) if cfg.distill else None

    palettize_(model, cfg.plan)
    if cfg.fsdp:
        fsdp_(model, cfg.fsdp)
    losses = _finetune(model, data, cfg.train, out / ("checkpoint_edkm" + (".dcp" if cfg.fsdp else ".pt")), cfg.resume,
                       teacher, cfg.distill, fsdp=cfg.fsdp is not None)
    if cfg.fsdp:
        finalize_fsdp_(model)  # a collective: indices gathered per shard, on every rank
    report: dict[str, Any] = {}
    if rank == 0:
        if not cfg.fsdp:
            finalize_(model)
        path = out / MODEL_FILE
        save_palettized(model, path)
        tokenizer.save_pretrained(out)  # `edkm eval/generate out/model.edkm.safetensors` find it here
        loaded = load_palettized(path)
        report = {
            "model": cfg.model or "bundled:stories260K",
            "fp_ppl": done.get("fp_ppl"), "fp_finetuned_ppl": done.get("fp_finetuned_ppl"),
            "rtn_ppl": done.get("rtn_ppl"), "kmeans_ptq_ppl": done.get("kmeans_ptq_ppl"),
            "edkm_ppl": ppl(loaded), "bits": bits, "plan": cfg.plan.to_dict(),
            "size_bytes": path.stat().st_size, "fp_size_bytes": fp_bytes,
            "rtn_size_bytes": done.get("rtn_size_bytes"), "kmeans_ptq_size_bytes": done.get("kmeans_ptq_size_bytes"),
            "steps": cfg.train.steps, "context": cfg.context, "heldout_tokens": int(held.numel()) - 1,
            "world_size": size, "seconds": round(time.perf_counter() - start, 1),  # this invocation (a resumed run counts from the resume)
            "train": asdict(cfg.train), "distill": cfg.distill, "control_lr": cfg.control_lr, "losses": losses, "fp_losses": done.get("fp_losses"),
            "sample": generate_text(loaded, tokenizer),
        }
        _write_json(out / "report.json", report)
    if size > 1:
        dist.barrier()
    return report
