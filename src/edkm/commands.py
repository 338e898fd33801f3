"""CLI subcommands that need the heavier parts (transformers, training, benchmarks)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch


def _load_any(path: str) -> tuple[Any, Any]:
    """(model, tokenizer) from a packed ``.safetensors`` file (tokenizer from its folder) or an HF folder."""
    from transformers import AutoTokenizer

    from .export import load_palettized
    from .models import BUNDLED_MODEL_DIR, load_causal_lm

    p = Path(path)
    if p.suffix == ".safetensors" or p.is_file():
        model = load_palettized(p).eval()
        tok_dir = p.parent if (p.parent / "tokenizer_config.json").is_file() else BUNDLED_MODEL_DIR
        return model, AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    return load_causal_lm(p)


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)


def cmd_compress(args: argparse.Namespace) -> None:
    from .compress import CompressConfig, compress
    from .config import PalettizeConfig
    from .train import TrainConfig

    overrides = {"embed_tokens|lm_head": {"bits": args.embed_bits}} if args.embed_bits else {}
    plan = PalettizeConfig(bits=args.bits, group_size=args.group_size, tau=args.tau, iters=args.iters,
                           memory=args.memory, overrides=overrides)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        tau_start=args.tau, tau_end=args.tau_end, seed=args.seed, progress=not args.quiet,
                        checkpoint_every=args.checkpoint_every)
    cfg = CompressConfig(model=args.model, text=args.text, alpaca=args.alpaca, context=args.context, out=args.out,
                         plan=plan, train=train, fp_control=not args.no_fp_control, control_lr=args.control_lr,
                         distill=args.distill, resume=args.resume)
    if args.fsdp:
        from .distributed import FSDPOptions

        cfg.fsdp = FSDPOptions(args.mixed_precision, args.activation_checkpointing, not args.fsdp_gathered_dkm)
    _init_distributed()
    report = compress(cfg)
    if report:
        print(format_report(report))


def format_report(r: dict[str, Any]) -> str:
    """The fp / RTN / k-means / eDKM table of a report as Markdown."""
    mb = lambda n: f"{n / 1e6:.3f} MB" if n else "-"  # noqa: E731
    b = r["bits"]
    rows = [
        ("fp32 original", r["fp_ppl"], r["fp_size_bytes"], "fp16"),
        (f"fp32 fine-tuned {r['steps']} steps (control)", r["fp_finetuned_ppl"], r["fp_size_bytes"], "fp16"),
        (f"RTN {b}-bit per channel", r["rtn_ppl"], r["rtn_size_bytes"], "file"),
        (f"k-means {b}-bit per tensor (post-training)", r["kmeans_ptq_ppl"], r["kmeans_ptq_size_bytes"], "file"),
        (f"eDKM {b}-bit per tensor, fine-tuned", r["edkm_ppl"], r["size_bytes"], "file"),
    ]
    lines = ["| model | held-out ppl | size |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {p:.3f} | {mb(s)} ({kind}) |" if p else f"| {name} | - | {mb(s)} |" for name, p, s, kind in rows]
    if r.get("fp_finetuned_ppl"):
        lines.append(f"\neDKM vs the fine-tuned control: {r['edkm_ppl'] / r['fp_finetuned_ppl'] - 1:+.1%}")
    return "\n".join(lines) + f"\n\nsample: {r.get('sample', '')!r}"


def cmd_eval(args: argparse.Namespace) -> None:
    from .data import load_text, split_text, tokenize_text
    from .eval.perplexity import perplexity

    model, tok = _load_any(args.model)
    result: dict[str, Any] = {}
    if args.text:
        text = load_text(args.text)
        if args.holdout:
            text = split_text(text, args.holdout)[1]
        result["ppl"] = perplexity(model, tokenize_text(tok, text), context=args.context)
    if args.tasks:
        from .eval.zeroshot import evaluate_tasks

        result["tasks"] = evaluate_tasks(model, tok, args.tasks.split(","), data_dir=args.data_dir, limit=args.limit)
    if not result:
        raise ValueError("nothing to evaluate: give --text FILE and/or --tasks piqa,arc_easy,...")
    print(json.dumps(result, indent=1))


def cmd_generate(args: argparse.Namespace) -> None:
    from .compress import generate_text

    model, tok = _load_any(args.model)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {"do_sample": False}
    print(generate_text(model, tok, args.prompt, args.max_new_tokens, **sampling))


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_memory_benchmark

    run_memory_benchmark(args)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("compress", help="fine-tune with eDKM clustering, export, evaluate (bundled model by default)")
    p.add_argument("--model", help="local Hugging Face checkpoint folder (default: bundled stories260K)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text", help="plain-text training file (default: bundled TinyStories)")
    data.add_argument("--alpaca", help="Alpaca-format JSON instruction data")
    p.add_argument("--out", default="runs/default")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--embed-bits", type=int, default=8, help="bits of embedding and output layer (0 = same as --bits)")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--memory", default="auto", help="plain | marshal+unique+shard | fused | auto ...")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.2, help="relative tau at the start (see PalettizeConfig)")
    p.add_argument("--tau-end", type=float, default=0.002, help="relative tau at the end (geometric annealing)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the eDKM fine-tuning")
    p.add_argument("--control-lr", type=float, default=5e-4, help="peak learning rate of the fp control")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fp-control", action="store_true", help="skip the fine-tuned fp control (big models)")
    p.add_argument("--distill", type=float, default=1.0,
                   help="weight of KL(teacher || model) in the eDKM loss, teacher = the fp control (0 = cross-entropy only)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints in --out")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from .distributed.options import add_fsdp_arguments, add_plan_parser  # (no torch import)

    add_fsdp_arguments(p)
    p.set_defaults(func=cmd_compress)
    add_plan_parser(sub)

    p = sub.add_parser("eval", help="perplexity on a text file and/or zero-shot tasks")
    p.add_argument("model", help="packed .safetensors file or Hugging Face folder")
    p.add_argument("--text", help="plain-text file for perplexity")
    p.add_argument("--holdout", type=float, default=None,
                   help="score only the last fraction of --text, as compress holds it out (e.g. 0.2)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--tasks", help="comma-separated: piqa,arc_easy,arc_challenge,winogrande,hellaswag")
    p.add_argument("--data-dir", type=Path, default=None, help="task files (default: bundled subsets)")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample from a model")
    p.add_argument("model")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("which", choices=["memory"])
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 4096])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/memory.json")
    p.add_argument("--md", default=None, help="Markdown table output (default: --out with .md)")
    p.add_argument("--iters", type=int, default=3, help="DKM centroid updates")
    p.add_argument("--tau", type=float, default=0.05, help="relative tau (x median squared centroid gap)")
    p.add_argument("--projections", type=int, default=4, help="layers of --shape in the block (q, k, v, o)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="processes for the sharded configs (gloo)")
    p.add_argument("--extrapolate-ranks", type=int, nargs="+", default=[8], help="rank counts computed from measured shards")
    p.add_argument("--configs", default=None, help="subset of plain,save_on_cpu,M,M+U,M+S,M+U+S,fused,coremltools")
    p.add_argument("--no-coreml", action="store_true", help="skip the coremltools reference (minutes)")
    p.add_argument("--per-projection", action="store_true", help="always measure one projection at a time")
    p.add_argument("--memory-limit-gib", type=float, default=12.0, help="memory all processes of one measurement may use")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement process")
    p.set_defaults(func=cmd_bench)
