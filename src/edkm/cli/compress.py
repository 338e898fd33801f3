"""``edkm compress``: the whole job (baselines, fp control, eDKM fine-tuning, packed export, evaluation).

Example:
    >>> flag_of("plan.bits"), flag_of("train.lr")
    ('--bits', '--lr')
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edkm.cli.options import add_device_argument, add_fsdp_arguments
from edkm.cli.validate import (
    bits,
    bits_or_zero,
    check_compress,
    nonnegative_int,
    positive_float,
    positive_int,
    unit_weight,
)

# the flag of each setting compared on --resume (jobs name settings by their key)
FLAGS = {
    "model": "--model",
    "text": "--text",
    "alpaca": "--alpaca",
    "context": "--context",
    "holdout": "--holdout",
    "plan.bits": "--bits",
    "plan.group_size": "--group-size",
    "plan.tau": "--tau",
    "plan.iters": "--iters",
    "plan.overrides": "--embed-bits",
    "train.steps": "--steps",
    "train.batch_size": "--batch-size",
    "train.grad_accum": "--grad-accum",
    "train.lr": "--lr",
    "plan.tau_end": "--tau-end",
    "train.seed": "--seed",
    "fp_control": "--no-fp-control",
    "control_lr": "--control-lr",
    "distill": "--distill",
    "eval": "--eval-text",
    "synthetic": "--synthetic",
}


def flag_of(key: str) -> str:
    """The command-line flag that sets the setting ``key`` (the key itself when none does)."""
    return FLAGS.get(key, key)


def cmd_compress(args: argparse.Namespace) -> None:
    # deferred: the job's modules import torch and transformers, which building the parser must not
    from edkm.distributed.device import init_distributed, resolve_device
    from edkm.jobs.compress import compress
    from edkm.jobs.runstate import ResumeMismatch
    from edkm.jobs.runtime import configure_threads
    from edkm.models import BUNDLED_MODEL_DIR

    check_compress(args, BUNDLED_MODEL_DIR)  # every flag and file, before anything loads
    cfg = compress_config(args, BUNDLED_MODEL_DIR, str(resolve_device(args.device)))
    configure_threads(args.model or BUNDLED_MODEL_DIR, args.threads)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar either
    init_distributed(resolve_device(args.device), single=args.fsdp)  # NCCL only for CUDA tensors
    try:
        report = compress(cfg)  # Ctrl-C: `cli.main` prints the --resume command
    except ResumeMismatch as err:
        raise ValueError(err.describe(flag_of(err.key))) from None
    if report:
        print(format_report(report))


def compress_config(args: argparse.Namespace, bundled_model_dir: Any, device: str) -> Any:
    """The job's CompressConfig from the command line (a --group-size checked on the model's shapes first)."""
    # deferred: torch, as in cmd_compress
    from edkm.config import EMBEDDING_LAYERS, PalettizeConfig
    from edkm.distributed import FSDPOptions
    from edkm.jobs.compress import CompressConfig
    from edkm.jobs.size import load_config, meta_model, palettized_size
    from edkm.training.loop import TrainConfig

    # the embedding/head at --embed-bits keep one LUT per tensor: a --group-size is for the decoder's layers
    # (at 8 bits a 256-entry LUT per 16 rows of a 576-wide embedding would cost 0.44 bits per weight)
    embed = {"bits": args.embed_bits, **({"group_size": None} if args.group_size else {})}
    overrides = {EMBEDDING_LAYERS: embed} if args.embed_bits else {}
    plan = PalettizeConfig(bits=args.bits, group_size=args.group_size, tau=args.tau, tau_end=args.tau_end,
                           iters=args.iters, overrides=overrides)  # fmt: skip
    if args.group_size:  # must divide every clustered layer's rows: checked on the config's shapes, as `edkm size` does
        palettized_size(meta_model(load_config(str(args.model or bundled_model_dir))), plan)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        seed=args.seed, progress=not args.quiet, checkpoint_every=args.checkpoint_every)  # fmt: skip
    fsdp = (
        FSDPOptions(args.mixed_precision, args.activation_checkpointing, not args.fsdp_gathered_dkm)
        if args.fsdp
        else None
    )
    bundled = args.model is None or Path(args.model).resolve() == Path(bundled_model_dir).resolve()
    teacher = args.teacher or ("control" if bundled and not args.no_fp_control else "original")
    warm_start = args.warm_start or ("kmeans" if bundled else "activation")
    if teacher == "control" and args.no_fp_control:
        raise ValueError("--teacher control needs the fp control: drop --no-fp-control, or use --teacher original")
    return CompressConfig(model=args.model, text=args.text, alpaca=args.alpaca, context=args.context, out=args.out,
                          eval_text=args.eval_text, eval_context=args.eval_context, eval_tokens=args.eval_tokens,
                          synthetic=args.synthetic,
                          plan=plan, memory=args.memory, train=train, fp_control=teacher == "control",
                          control_lr=args.control_lr, distill=args.distill, warm_start=warm_start, resume=args.resume,
                          keep_checkpoints=args.keep_checkpoints, device=device, fsdp=fsdp)  # fmt: skip


def recipe(r: dict[str, Any]) -> str:
    """How a report's eDKM run departs from the default recipe: a Fisher warm start, LUTs kept at it."""
    start = ", Fisher-weighted warm start" if r.get("warm_start") == "fisher" else ""
    return start + (", LUT fixed (--iters 0)" if (r.get("plan") or {}).get("iters") == 0 else "")


def format_report(r: dict[str, Any]) -> str:
    """The fp / RTN / k-means / eDKM table of a report as Markdown."""
    mb = lambda n: f"{n / 1e6:.3f} MB" if n else "-"  # noqa: E731
    b = r["bits"]
    group = (r.get("plan") or {}).get("group_size")
    lut = f"per {group} rows" if group else "per tensor"  # the LUTs of k-means and eDKM (--group-size)
    start = ", eDKM's warm start" if r.get("warm_start", "activation") == "activation" else ""
    rows = [
        ("fp32 original", r["fp_ppl"], r["fp_size_bytes"], "fp16"),
        (f"fp32 fine-tuned {r['steps']} steps (control)", r["fp_finetuned_ppl"], r["fp_size_bytes"], "fp16"),
        (f"RTN {b}-bit per channel", r["rtn_ppl"], r["rtn_size_bytes"], "file"),
        (f"k-means {b}-bit {lut} (post-training)", r["kmeans_ptq_ppl"], r["kmeans_ptq_size_bytes"], "file"),
        *[
            (f"{label} ({r[key + '_bpw']:.2f} bits/weight)", r[key + "_ppl"], r[key + "_size_bytes"], "file")
            for key, label in (
                ("kmeans_aw", f"activation-aware k-means {b}-bit {lut} (post-training{start})"),
                ("gptq", f"GPTQ {b}-bit per channel"),
                ("gptq_g128", f"GPTQ {b}-bit g128"),
                ("squeeze", f"Fisher-weighted k-means {b}-bit per row"),
            )
            if r.get(key + "_ppl")
        ],
        (f"eDKM {b}-bit {lut}{recipe(r)}, fine-tuned", r["edkm_ppl"], r["size_bytes"], "file"),
    ]
    lines = ["| model | test ppl | size |", "| --- | ---: | ---: |"]
    lines += [
        f"| {name} | {p:.3f} | {mb(s)} ({kind}) |" if p else f"| {name} | - | {mb(s)} |" for name, p, s, kind in rows
    ]
    if r.get("fp_finetuned_ppl"):
        lines.append(f"\neDKM vs the fine-tuned control: {r['edkm_ppl'] / r['fp_finetuned_ppl'] - 1:+.1%}")
    env = r.get("environment")
    if env:
        lines.append(
            f"edkm {env['edkm_version']}, torch {env['torch_version']}, {env['torch_threads']} thread(s) x "
            f"{r.get('world_size', 1)} process(es) on {env['device']}, {r['seconds']:.0f} s"
        )
    return "\n".join(lines) + f"\n\nsample: {r.get('sample', '')!r}"


def add_compress_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        help="fine-tune with eDKM clustering, export, evaluate (bundled model by default)",
        description="The whole job: baselines, fp control, eDKM fine-tuning, packed export, evaluation. "
        "Progress goes to stderr (--quiet: none); the results table to stdout.",
    )
    p.add_argument("--model", help="local Hugging Face checkpoint folder (default: the bundled stories260K)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text", help="plain-text training file, last 20%% held out (default: the bundled TinyStories)")
    data.add_argument("--alpaca", help="Alpaca-format JSON instruction data instead of --text")
    p.add_argument("--out", default="runs/default", help="run folder: report, packed model, checkpoints")
    p.add_argument("--bits", type=bits, default=3, help="bits per clustered weight (LUT of 2^bits entries)")
    p.add_argument(
        "--embed-bits",
        type=bits_or_zero,
        default=8,
        help="bits of embedding and output layer, one LUT per tensor (0 = same as --bits and --group-size)",
    )
    p.add_argument(
        "--group-size", type=positive_int, default=None, help="output channels per LUT (default: one LUT per tensor)"
    )
    p.add_argument("--memory", default="auto", help="DKM memory mode: plain, marshal+unique+shard, fused, auto, ...")
    p.add_argument("--iters", type=nonnegative_int, default=3, help="DKM centroid updates per forward")
    p.add_argument("--tau", type=positive_float, default=0.2, help="relative tau at the start (see PalettizeConfig)")
    p.add_argument(
        "--tau-end", type=positive_float, default=0.002, help="relative tau at the end (geometric annealing)"
    )
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps of the fp control and of eDKM each")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per optimizer step (all processes)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate of the eDKM fine-tuning")
    p.add_argument("--control-lr", type=positive_float, default=5e-4, help="peak learning rate of the fp control")
    p.add_argument("--context", type=positive_int, default=256, help="tokens per training sequence and eval window")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    add_recipe_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out (refused if its settings differ)")
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the training checkpoints when the run completes"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads per process (default: OMP_NUM_THREADS, else 1 for weight files under 64 MiB, "
        "else the cores / processes)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_device_argument(p)
    add_fsdp_arguments(p)
    p.set_defaults(func=cmd_compress)


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The teacher, the distillation loss, synthetic data and the evaluation text of ``edkm compress``."""
    p.add_argument("--no-fp-control", action="store_true", help="skip the fine-tuned fp control (big models)")
    p.add_argument(
        "--teacher",
        choices=["control", "original"],
        default=None,
        help="distillation teacher: the fine-tuned fp control, or the original model (no control is "
        "trained); default: control for the bundled model, original for a given --model",
    )
    p.add_argument(
        "--warm-start",
        choices=["kmeans", "activation", "fisher"],
        default=None,
        help="eDKM's first centroids: k-means of the values, activation-aware k-means (each weight's error "
        "weighted by its input's mean square on 32 training sequences; keeps the few large weights real LLMs "
        "depend on), or Fisher-weighted k-means (by squared gradients of the loss on them, as SqueezeLLM; "
        "layers at > 4 bits stay activation-aware); default: kmeans for the bundled model, activation for a "
        "given --model",
    )
    p.add_argument(
        "--eval-text",
        default=None,
        help="score every model on this file instead of the test split (never trained on), e.g. WikiText-2 "
        "test: edkm/assets/wikitext2/wiki.test.raw",
    )
    p.add_argument(
        "--eval-context",
        type=positive_int,
        default=None,
        help="tokens per window on --eval-text, each token scored once (default: --context; 2048 as GPTQ/AWQ report)",
    )
    p.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=None,
        help="only the first N tokens of --eval-text (a fixed subset; default: all)",
    )
    p.add_argument(
        "--synthetic",
        type=nonnegative_int,
        default=0,
        help="data-free distillation: train on N sequences the original model writes itself (LLM-QAT; seeded, "
        "cached in --out as synthetic.pt); --text still gives the test split unless --eval-text",
    )
    p.add_argument(
        "--distill",
        type=unit_weight,
        default=1.0,
        help="weight of KL(teacher || model) in the eDKM loss, teacher = the fp control (0 = cross-entropy only)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=nonnegative_int,
        default=50,
        help="steps between checkpoints in --out (0 = at the end)",
    )
