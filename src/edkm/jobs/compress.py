"""`edkm compress`: the user's whole job on one model.

load -> baselines (RTN, post-training k-means, GPTQ, Fisher-weighted k-means) -> fine-tune with eDKM
(and, as the fair control, without clustering) -> finalize -> save as a Hugging Face folder (packed, see
:mod:`edkm.hf.folder`) -> reload -> evaluate -> ``report.json`` and the model card ``README.md``.
Every perplexity is measured on the test split (the last ``test`` fraction of the text) with the same
context; the validation split before it is for tuning (``edkm compare``). Under ``torchrun``
every rank trains (DDP, gloo on CPU / nccl on GPU); rank 0 evaluates and writes.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from edkm.atomic import write_json
from edkm.config import PalettizeConfig
from edkm.data.text import (
    PackedDataset,
    check_seq_len,
    load_alpaca,
    load_text,
    split_records,
    split_text,
    tokenize_alpaca,
    tokenize_text,
)
from edkm.distributed import FSDPOptions, finalize_fsdp_, fsdp_, shard_layers_
from edkm.eval.generate import generate_text
from edkm.eval.perplexity import perplexity
from edkm.export import save_palettized
from edkm.export.card import model_card
from edkm.export.files import FOLDER_WEIGHTS, REPORT_FILE
from edkm.hf.folder import save_folder, write_model_card
from edkm.hf.load import load_palettized
from edkm.jobs.costs import baseline_shares, job_costs
from edkm.jobs.progress import JobProgress
from edkm.jobs.runstate import Run, open_run, prune_checkpoints
from edkm.jobs.runtime import run_environment
from edkm.models import BUNDLED_TEXT, load_causal_lm
from edkm.peers.baselines import ptq_kmeans_, rtn_
from edkm.peers.calibrate import warm_start_importance
from edkm.peers.fast import FAST_PEERS, calibration, fast_peers
from edkm.training.finetune import finetune, loss_label
from edkm.training.loop import TrainConfig, batch_indices
from edkm.training.synthetic import model_sequences
from edkm.transform import clustered_fraction, finalize_, palettize_, warm_start_

__all__ = ["CompressConfig", "compress", "job_costs"]


@dataclass
class CompressConfig:
    model: str | None = None  # local HF checkpoint folder; None = bundled stories260K
    text: str | None = None  # plain-text training file; None = bundled TinyStories (unless alpaca)
    alpaca: str | None = None  # Alpaca JSON instead of text
    holdout: float = 0.2  # held-out fraction (text: last fraction by characters; alpaca: last records)
    test: float = 0.1  # of it, the last fraction is the test split (reported); the rest is validation (tuning)
    context: int = 256
    eval_text: str | None = None  # score every model on this file instead of the test split (e.g. WikiText-2 test)
    eval_context: int | None = None  # tokens per eval window on eval_text (None = context): 2048 as GPTQ/AWQ report
    eval_tokens: int | None = None  # only the first N tokens of eval_text (a documented subset; None = all)
    synthetic: int = 0  # train on N sequences the original model writes (data-free, LLM-QAT); 0 = the text
    out: str = "runs/default"
    plan: PalettizeConfig = field(default_factory=PalettizeConfig)
    memory: str = "auto"  # eDKM memory mode of palettize_ (changes no value: not a setting compared on --resume)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp_control: bool = True  # also fine-tune without clustering for the same steps
    control_lr: float | None = 5e-4  # peak lr of the fp control (None = train.lr); its best measured, see README
    distill: float = 1.0  # weight of KL(teacher || model) in the eDKM loss (0 = plain cross-entropy)
    warm_start: str = "kmeans"  # eDKM's first centroids: k-means of the values, "activation"-aware or "fisher"
    resume: bool = False
    keep_checkpoints: bool = False  # keep the training checkpoints of a finished run
    device: str = "cpu"  # model, data and DKM state live here ("cuda", "cuda:1", ...)
    fsdp: FSDPOptions | None = None  # shard the eDKM fine-tuning with FSDP2 (under torchrun)

    def settings(self) -> dict[str, Any]:
        """What decides the result (compared on --resume): paths resolved, no output/progress knobs."""
        resolve = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
        return {
            "model": resolve(self.model) if self.model and Path(self.model).exists() else self.model,  # or a name
            "text": resolve(self.text),
            "alpaca": resolve(self.alpaca),
            "holdout": self.holdout,
            "test": self.test,
            "context": self.context,
            "plan": self.plan.to_dict(),
            "train": asdict(self.train),
            "fp_control": self.fp_control,
            "control_lr": self.control_lr,
            "distill": self.distill,
            **({"eval": [resolve(self.eval_text), self.eval_context, self.eval_tokens]} if self.eval_text else {}),
            **({"synthetic": self.synthetic} if self.synthetic else {}),
            **({"warm_start": self.warm_start} if self.warm_start != "kmeans" else {}),
        }


def split_data(cfg: CompressConfig, tokenizer: Any) -> tuple[PackedDataset, torch.Tensor, torch.Tensor]:
    """Training sequences of context+1 tokens, and the validation and test token streams.

    The test split is the last ``cfg.test`` of the data (what ``edkm eval --holdout <test>`` scores),
    validation the ``cfg.holdout - cfg.test`` before it, training the rest.
    """
    if not 0 < cfg.test < cfg.holdout < 1:
        raise ValueError(f"need 0 < test ({cfg.test}) < holdout ({cfg.holdout}) < 1")
    val_part = (cfg.holdout - cfg.test) / (1 - cfg.test)
    if cfg.alpaca:
        rest, test_recs = split_records(load_alpaca(cfg.alpaca), cfg.test)
        train_recs, val_recs = split_records(rest, val_part)
        train_set = PackedDataset.from_examples(
            tokenize_alpaca(tokenizer, train_recs), cfg.context + 1, "the training records"
        )
        stream = lambda recs: torch.cat([e.input_ids for e in tokenize_alpaca(tokenizer, recs)])  # noqa: E731
        return train_set, stream(val_recs), stream(test_recs)
    rest, test_text = split_text(load_text(cfg.text or BUNDLED_TEXT), cfg.test)
    train_text, val_text = split_text(rest, val_part)
    train_set = PackedDataset.from_tokens(tokenize_text(tokenizer, train_text), cfg.context + 1, "the training text")
    return train_set, tokenize_text(tokenizer, val_text), tokenize_text(tokenizer, test_text)


def _file_size(model: nn.Module, path: Path) -> int:
    save_palettized(model, path)
    return path.stat().st_size


def evaluation_tokens(cfg: CompressConfig, tokenizer: Any, test: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tokens every perplexity is measured on, window length): the test split of the training data, or
    ``cfg.eval_text`` (never trained on; its first ``eval_tokens`` when set) in windows of ``eval_context``."""
    if not cfg.eval_text:
        return test, cfg.context
    tokens = tokenize_text(tokenizer, load_text(cfg.eval_text))
    return (tokens[: cfg.eval_tokens] if cfg.eval_tokens else tokens), cfg.eval_context or cfg.context


def compress(cfg: CompressConfig) -> dict[str, Any]:
    """Run the whole job; returns the report (also written to ``<out>/report.json`` by rank 0).

    Progress goes to stderr in five numbered phases (``cfg.train.progress``); see ``edkm.jobs.progress``.
    """
    start = time.perf_counter()
    run = open_run(cfg)
    if run.state == "complete":
        run.say(f"{run.out} holds a finished run with these settings: its report, not recomputed")
        return json.loads((run.out / REPORT_FILE).read_text()) if run.rank == 0 else {}
    if cfg.resume and run.state == "fresh":
        run.say(f"--resume: no checkpoint in {run.out}: starting fresh")
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_causal_lm(cfg.model)
    model.to(cfg.device)  # before palettize_: the DKM state is created beside the weights
    check_seq_len(cfg.context, model.config)
    data, _val, held = split_data(cfg, tokenizer)  # every number reported is on the test split
    if cfg.synthetic:  # data-free: the original model's own sequences (cached: a resumed run reuses them)
        seqs = model_sequences(model, cfg.synthetic, cfg.context + 1, cfg.train.seed, run.out / "synthetic.pt")
        data = PackedDataset(seqs, seqs.clone())
    batch_indices(0, len(data), cfg.train)  # a batch larger than the data fails here, before any baseline
    held, eval_context = evaluation_tokens(cfg, tokenizer, held)
    run.ppl = lambda m: perplexity(m, held, context=eval_context)
    run.job = JobProgress(job_costs(cfg, held.numel()), enabled=cfg.train.progress and run.rank == 0)
    params = {id(p): p for p in model.parameters()}.values()
    fp_bytes = sum(p.numel() * 2 for p in params)
    run.job.print(
        f"edkm compress: {sum(p.numel() for p in params):,} parameters, {len(data)} training sequences of "
        f"{cfg.context} tokens, {held.numel():,} held-out tokens, {torch.get_num_threads()} torch thread(s) "
        f"x {run.size} process(es)"
    )
    baselines(run, model, data, held.numel())
    run.keep_phase_times()
    teacher = fp_control(run, model, data)
    losses, loss_name = train_edkm(run, model, data, teacher)
    run.keep_phase_times()
    report: dict[str, Any] = {}
    if run.rank == 0:
        report = export_and_evaluate(run, model, tokenizer, held)
        run.keep_phase_times()
        report.update(losses=losses, loss=loss_name, fp_bytes=fp_bytes)
        report = finish_report(run, report, held, start)
    if run.size > 1:
        dist.barrier()
    return report


def baselines(run: Run, model: nn.Module, data: PackedDataset, held_tokens: int) -> None:
    """fp, RTN, post-training k-means, GPTQ and Fisher-weighted k-means perplexity (rank 0; once per run folder)."""
    cfg, bits = run.cfg, run.cfg.plan.bits
    finished = [n for n in FAST_PEERS if f"{n}_ppl" in run.done]  # a stopped job resumes after the last finished
    if ("rtn_ppl" in run.done and len(finished) == len(FAST_PEERS)) or run.rank != 0:
        run.job.skip("baselines", "restored from progress.json" if run.rank == 0 else "rank 0 only")
        return
    detail = "fp, RTN, post-training k-means (plain and activation-aware), GPTQ and Fisher-weighted k-means ppl"
    with run.job.phase(
        "baselines", total=9, unit="eval", detail=detail, shares=baseline_shares(cfg, held_tokens)
    ) as bar:
        if "rtn_ppl" in run.done:
            bar.update(5 + len(finished), note="fp, RTN, k-means and finished peers restored from progress.json")
            _peers(run, model, data, bar, finished)
            return
        fp_ppl = run.ppl(model)
        bar.update(note=f"fp32 original ppl {fp_ppl:.3f}")
        rtn = rtn_(copy.deepcopy(model), cfg.plan)
        rtn_size = _file_size(rtn, run.out / "rtn.edkm.safetensors")
        bar.update(note=f"RTN {bits}-bit built ({rtn_size / 1e3:.0f} kB)")
        rtn_ppl = run.ppl(rtn)
        bar.update(note=f"RTN {bits}-bit ppl {rtn_ppl:.3f}")
        km = ptq_kmeans_(copy.deepcopy(model), cfg.plan)
        km_size = _file_size(km, run.out / "kmeans.edkm.safetensors")
        km_ppl = run.ppl(km)
        bar.update(2, note=f"k-means {bits}-bit ppl {km_ppl:.3f}")
        run.record(
            fp_ppl=fp_ppl,
            rtn_ppl=rtn_ppl,
            rtn_size_bytes=rtn_size,
            kmeans_ptq_ppl=km_ppl,
            kmeans_ptq_size_bytes=km_size,
        )
        _peers(run, model, data, bar, finished)


def _peers(run: Run, model: nn.Module, data: PackedDataset, bar: Any, finished: list[str]) -> None:
    """The fast peers not ``finished`` yet, each recorded as it ends."""

    def done(name: str, entry: dict[str, Any]) -> None:
        run.record(**entry)
        bar.update(note=f"{name} {run.cfg.plan.bits}-bit ppl {entry[f'{name}_ppl']:.3f}")

    fast_peers(model, data, run.cfg.plan, run.ppl, run.out, done, skip=finished)


def fp_control(run: Run, model: nn.Module, data: PackedDataset) -> nn.Module | None:
    """The fine-tuned fp control (the fair comparison and the teacher), or the original model as the teacher."""
    cfg, done, teacher = run.cfg, run.done, None
    if cfg.fp_control:
        teacher = copy.deepcopy(model)  # trained here, or reloaded from its final checkpoint on --resume
        if cfg.fsdp:  # sharded like the eDKM model, with the same precision policy
            shard_layers_(teacher, cfg.fsdp)
        control = replace(cfg.train, lr=cfg.control_lr or cfg.train.lr)
        detail = f"fine-tuning without clustering, loss {loss_label(0)}"
        with run.job.phase("fp control", total=cfg.train.steps, detail=detail) as bar:
            fp_ckpt = run.out / ("checkpoint_fp" + (".dcp" if cfg.fsdp else ".pt"))
            fp_losses = finetune(
                teacher, data, control, fp_ckpt, run.state == "resume", bar=bar, fsdp=cfg.fsdp is not None
            )
            if "fp_finetuned_ppl" not in done:  # a sharded model evaluates on every rank (its forward gathers)
                run.record(
                    fp_finetuned_ppl=run.ppl(teacher) if run.rank == 0 or cfg.fsdp else None, fp_losses=fp_losses
                )
                bar.update(0, note=f"fine-tuned fp32 ppl {done['fp_finetuned_ppl'] or 0:.3f}")
    else:
        run.job.skip("fp control", "skipped (--no-fp-control)")
    if cfg.distill and teacher is None:  # no control: the original model is the distillation teacher
        teacher = shard_layers_(copy.deepcopy(model), cfg.fsdp) if cfg.fsdp else copy.deepcopy(model)
    return teacher.eval().requires_grad_(False) if cfg.distill else None


def train_edkm(run: Run, model: nn.Module, data: PackedDataset, teacher: nn.Module | None) -> tuple[list[float], str]:
    """Fine-tune ``model`` with clustering (in place, finalized on every rank under FSDP); (losses, loss name)."""
    cfg = run.cfg
    importance = warm_start_importance(model, calibration(data), cfg.warm_start, cfg.plan)
    palettize_(model, cfg.plan, memory=cfg.memory)
    if importance is not None:  # on a resumed run the checkpoint's centroids replace these
        warm_start_(model, importance)
    if cfg.fsdp:
        fsdp_(model, cfg.fsdp)
    loss_name = loss_label(cfg.distill if teacher is not None else 0.0)
    checkpoint = run.out / ("checkpoint_edkm" + (".dcp" if cfg.fsdp else ".pt"))
    detail = f"fine-tuning with {cfg.plan.bits}-bit clustering, loss {loss_name}"
    with run.job.phase("eDKM", total=cfg.train.steps, detail=detail) as bar:
        losses = finetune(
            model,
            data,
            cfg.train,
            checkpoint,
            run.state == "resume",
            teacher,
            cfg.distill,
            bar,
            fsdp=cfg.fsdp is not None,
        )
    if cfg.fsdp:
        finalize_fsdp_(model)  # a collective: indices gathered per shard, on every rank
    return losses, loss_name


def export_and_evaluate(run: Run, model: nn.Module, tokenizer: Any, held: torch.Tensor) -> dict[str, Any]:
    """Save the Hugging Face folder, reload it, score it and sample from it (rank 0)."""
    cfg = run.cfg
    with run.job.phase("export", total=3, unit="file", detail="hard LUTs, packed save, reload") as bar:
        if not cfg.fsdp:
            finalize_(model)
        save_folder(model, run.out, tokenizer)  # a Hugging Face folder: config.json, model.safetensors, tokenizer
        path = run.out / FOLDER_WEIGHTS
        bar.update(2, note=f"{path} ({path.stat().st_size / 1e3:.0f} kB)")
        loaded = load_palettized(run.out).to(cfg.device)
        bar.update()
    with run.job.phase(
        "evaluation", total=2, unit="eval", detail="held-out perplexity of the reloaded model, a sample"
    ) as bar:
        edkm_ppl = run.ppl(loaded)
        bar.update(note=f"eDKM ppl {edkm_ppl:.3f}")
        sample = generate_text(loaded, tokenizer)
        bar.update()
    return {
        "edkm_ppl": edkm_ppl,
        "clustered_fraction": clustered_fraction(loaded),
        "size_bytes": path.stat().st_size,
        "sample": sample,
    }


def eval_split(cfg: CompressConfig, held: torch.Tensor) -> str:
    """What the report's perplexities are measured on."""
    if not cfg.eval_text:
        return f"test (last {cfg.test:g})"
    return f"{Path(cfg.eval_text).name}: {held.numel():,} tokens, windows of {cfg.eval_context or cfg.context}"


def finish_report(run: Run, measured: dict[str, Any], held: torch.Tensor, start: float) -> dict[str, Any]:
    """The report (same keys and order as ever), written with the model card; the run marked complete."""
    cfg, done = run.cfg, run.done
    control_ppl, edkm_ppl = done.get("fp_finetuned_ppl"), measured["edkm_ppl"]
    report = {
        "model": cfg.model or "bundled:stories260K",
        "fp_ppl": done.get("fp_ppl"),
        "fp_finetuned_ppl": control_ppl,
        "rtn_ppl": done.get("rtn_ppl"),
        "kmeans_ptq_ppl": done.get("kmeans_ptq_ppl"),
        "edkm_ppl": edkm_ppl,
        "gap_to_control": edkm_ppl / control_ppl - 1 if control_ppl else None,
        "bits": cfg.plan.bits,
        "plan": cfg.plan.to_dict(),
        "clustered_fraction": measured["clustered_fraction"],
        "size_bytes": measured["size_bytes"],
        "fp_size_bytes": measured["fp_bytes"],
        "rtn_size_bytes": done.get("rtn_size_bytes"),
        "kmeans_ptq_size_bytes": done.get("kmeans_ptq_size_bytes"),
        **{k: v for k, v in done.items() if k.startswith(("gptq", "squeeze", "kmeans_aw"))},
        "eval_split": eval_split(cfg, held),
        "steps": cfg.train.steps,
        "context": cfg.context,
        "heldout_tokens": int(held.numel()) - 1,
        "world_size": run.size,
        "seconds": round(time.perf_counter() - start, 1),  # this invocation (a resumed run counts from the resume)
        "phases": done.get("phases", {}),  # wall seconds and peak RSS of each phase (Run.keep_phase_times)
        "train": asdict(cfg.train),
        "distill": cfg.distill,
        "warm_start": cfg.warm_start,
        "control_lr": cfg.control_lr,
        "loss": measured["loss"],
        "losses": measured["losses"],
        "fp_loss": loss_label(0),
        "fp_losses": done.get("fp_losses"),
        "environment": {**run_environment(cfg.device), "world_size": run.size},
        "sample": measured["sample"],
    }
    write_json(run.out / REPORT_FILE, report)
    write_model_card(run.out, model_card(report))
    run.record(complete=True)
    if not cfg.keep_checkpoints:
        prune_checkpoints(run.out)
    return report
