"""The heavier CLI subcommands (compress, eval, generate, bench) and ``add_commands``, where every
subcommand module registers its parser. Building parsers imports neither torch nor transformers:
each command imports what it needs when it runs (``edkm --help`` stays instant)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edkm.cli.validate import bits, bits_or_zero, check_compress, check_eval, find_model, fraction, nonnegative_float, nonnegative_int, positive_float, positive_int, top_p, unit_weight
from edkm.bench.generate import add_bench_generate_parser
from edkm.bench.train import add_train_parser
from edkm.cli.export import add_export_parser
from edkm.jobs.compare import add_compare_parser
from edkm.distributed.device import add_device_argument, init_distributed, resolve_device
from edkm.cli.options import add_fsdp_arguments, add_plan_parser


def _load_any(path: str, tokenizer: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a run folder, a packed ``.safetensors`` file or an HF folder.

    A packed file takes the tokenizer beside it or ``--tokenizer`` (see ``cli_validate.find_model``).
    """
    from transformers import AutoTokenizer

    from edkm.export import is_edkm_folder
    from edkm.hf.load import load_palettized
    from edkm.models import load_causal_lm

    p, tok_dir = find_model(path, tokenizer)
    if p.suffix == ".safetensors" or p.is_file() or is_edkm_folder(p):
        model = load_palettized(p).eval()
        return model, AutoTokenizer.from_pretrained(tok_dir or (p if p.is_dir() else p.parent), local_files_only=True)
    model, tok = load_causal_lm(p)
    return model, AutoTokenizer.from_pretrained(tok_dir, local_files_only=True) if tok_dir else tok


def cmd_compress(args: argparse.Namespace) -> None:
    from edkm.models import BUNDLED_MODEL_DIR

    check_compress(args, BUNDLED_MODEL_DIR)  # every flag and file, before anything loads
    from edkm.jobs.compress import CompressConfig, compress
    from edkm.config import EMBEDDING_LAYERS, PalettizeConfig
    from edkm.jobs.runtime import configure_threads
    from edkm.training.loop import TrainConfig

    overrides = {EMBEDDING_LAYERS: {"bits": args.embed_bits}} if args.embed_bits else {}
    plan = PalettizeConfig(bits=args.bits, group_size=args.group_size, tau=args.tau, iters=args.iters,
                           memory=args.memory, overrides=overrides)
    if args.group_size:  # must divide every clustered layer's rows: checked on the config's shapes, as `edkm size` does
        from edkm.jobs.size import load_config, meta_model, palettized_size

        palettized_size(meta_model(load_config(str(args.model or BUNDLED_MODEL_DIR))), plan)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        tau_start=args.tau, tau_end=args.tau_end, seed=args.seed, progress=not args.quiet,
                        checkpoint_every=args.checkpoint_every)
    cfg = CompressConfig(model=args.model, text=args.text, alpaca=args.alpaca, context=args.context, out=args.out,
                         plan=plan, train=train, fp_control=not args.no_fp_control, control_lr=args.control_lr,
                         distill=args.distill, resume=args.resume, keep_checkpoints=args.keep_checkpoints,
                         device=str(resolve_device(args.device)))
    if args.fsdp:
        from edkm.distributed import FSDPOptions

        cfg.fsdp = FSDPOptions(args.mixed_precision, args.activation_checkpointing, not args.fsdp_gathered_dkm)
    configure_threads(args.model or BUNDLED_MODEL_DIR, args.threads)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar either
    init_distributed(resolve_device(args.device), single=args.fsdp)  # NCCL only for CUDA tensors
    report = compress(cfg)  # Ctrl-C: `cli.main` prints the --resume command
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
        *[(f"{label} ({r[key + '_bpw']:.2f} bits/weight)", r[key + "_ppl"], r[key + "_size_bytes"], "file")
          for key, label in (("gptq", f"GPTQ {b}-bit per channel"), ("squeeze", f"Fisher-weighted k-means {b}-bit per row"))
          if r.get(key + "_ppl")],
        (f"eDKM {b}-bit per tensor, fine-tuned", r["edkm_ppl"], r["size_bytes"], "file"),
    ]
    lines = ["| model | test ppl | size |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {p:.3f} | {mb(s)} ({kind}) |" if p else f"| {name} | - | {mb(s)} |" for name, p, s, kind in rows]
    if r.get("fp_finetuned_ppl"):
        lines.append(f"\neDKM vs the fine-tuned control: {r['edkm_ppl'] / r['fp_finetuned_ppl'] - 1:+.1%}")
    env = r.get("environment")
    if env:
        lines.append(f"edkm {env['edkm_version']}, torch {env['torch_version']}, {env['torch_threads']} thread(s) x "
                     f"{r.get('world_size', 1)} process(es) on {env['device']}, {r['seconds']:.0f} s")
    return "\n".join(lines) + f"\n\nsample: {r.get('sample', '')!r}"


def cmd_eval(args: argparse.Namespace) -> None:
    check_eval(args)
    from edkm.data.text import load_text, split_text, tokenize_text
    from edkm.eval.perplexity import perplexity
    from edkm.eval.zeroshot import TASKS, evaluate_tasks

    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else []
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    model, tok = _load_any(args.model, args.tokenizer)
    model.to(resolve_device(args.device))
    result: dict[str, Any] = {}
    if args.text:
        text = load_text(args.text)
        if args.holdout:
            text = split_text(text, args.holdout)[1]
        result["ppl"] = perplexity(model, tokenize_text(tok, text), context=args.context)
    if tasks:
        result["tasks"] = evaluate_tasks(model, tok, tasks, data_dir=args.data_dir, limit=args.limit)
    print(json.dumps(result, indent=1))


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from edkm.jobs.compress import generate_text

    model, tok = _load_any(args.model, args.tokenizer)
    model.to(resolve_device(args.device))
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {"do_sample": False}
    print(generate_text(model, tok, args.prompt, args.max_new_tokens, **sampling))


def cmd_bench(args: argparse.Namespace) -> None:
    from edkm.bench import run_memory_benchmark

    run_memory_benchmark(args)


def add_compress_parser(sub: Any) -> None:
    p = sub.add_parser("compress", help="fine-tune with eDKM clustering, export, evaluate (bundled model by default)",
                       description="The whole job: baselines, fp control, eDKM fine-tuning, packed export, evaluation. "
                                   "Progress goes to stderr (--quiet: none); the results table to stdout.")
    p.add_argument("--model", help="local Hugging Face checkpoint folder (default: the bundled stories260K)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text", help="plain-text training file, last 20%% held out (default: the bundled TinyStories)")
    data.add_argument("--alpaca", help="Alpaca-format JSON instruction data instead of --text")
    p.add_argument("--out", default="runs/default", help="run folder: report, packed model, checkpoints")
    p.add_argument("--bits", type=bits, default=3, help="bits per clustered weight (LUT of 2^bits entries)")
    p.add_argument("--embed-bits", type=bits_or_zero, default=8, help="bits of embedding and output layer (0 = same as --bits)")
    p.add_argument("--group-size", type=positive_int, default=None, help="output channels per LUT (default: one LUT per tensor)")
    p.add_argument("--memory", default="auto", help="DKM memory mode: plain, marshal+unique+shard, fused, auto, ...")
    p.add_argument("--iters", type=nonnegative_int, default=3, help="DKM centroid updates per forward")
    p.add_argument("--tau", type=positive_float, default=0.2, help="relative tau at the start (see PalettizeConfig)")
    p.add_argument("--tau-end", type=positive_float, default=0.002, help="relative tau at the end (geometric annealing)")
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps of the fp control and of eDKM each")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per optimizer step (all processes)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate of the eDKM fine-tuning")
    p.add_argument("--control-lr", type=positive_float, default=5e-4, help="peak learning rate of the fp control")
    p.add_argument("--context", type=positive_int, default=256, help="tokens per training sequence and eval window")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    p.add_argument("--no-fp-control", action="store_true", help="skip the fine-tuned fp control (big models)")
    p.add_argument("--distill", type=unit_weight, default=1.0,
                   help="weight of KL(teacher || model) in the eDKM loss, teacher = the fp control (0 = cross-entropy only)")
    p.add_argument("--checkpoint-every", type=nonnegative_int, default=50, help="steps between checkpoints in --out (0 = at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (refused if its settings differ)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the training checkpoints when the run completes")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per process (default: OMP_NUM_THREADS, else 1 for weight files under 64 MiB, "
                        "else the cores / processes)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_device_argument(p)
    add_fsdp_arguments(p)
    p.set_defaults(func=cmd_compress)


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity on a text file and/or zero-shot tasks")
    p.add_argument("model", help="run folder (edkm compress --out), packed .safetensors file or Hugging Face folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's own; required for a packed file without one)")
    p.add_argument("--text", help="plain-text file for perplexity")
    p.add_argument("--holdout", type=fraction, default=None,
                   help="score only the last fraction of --text, as compress holds it out, e.g. 0.2 (default: all of it)")
    p.add_argument("--context", type=positive_int, default=256, help="tokens per perplexity window")
    p.add_argument("--tasks", help="comma-separated zero-shot tasks: piqa, arc_easy, arc_challenge, winogrande, "
                                   "hellaswag, boolq, openbookqa, social_i_qa")
    p.add_argument("--data-dir", type=Path, default=None, help="task files (default: the bundled 50-item subsets)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N items of each task (default: all)")
    add_device_argument(p)
    p.set_defaults(func=cmd_eval)


def add_generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="sample from a model")
    p.add_argument("model", help="run folder (edkm compress --out), packed .safetensors file or Hugging Face folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's own; required for a packed file without one)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start of a story)")
    p.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to generate")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=top_p, default=0.9, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_device_argument(p)
    p.set_defaults(func=cmd_generate)


def add_bench_memory_parser(bench: Any) -> None:
    p = bench.add_parser("memory", help="what DKM holds for backward under each eDKM memory technique")
    p.add_argument("--shape", type=positive_int, nargs=2, default=[4096, 4096], help="rows and columns of each projection")
    p.add_argument("--bits", type=bits, default=3, help="bits per clustered weight")
    p.add_argument("--out", default=BENCH_RUN_DIR + "/memory.json",
                   help="JSON output; the committed results are updated only with --out benchmarks/results/memory.json")
    p.add_argument("--md", default=None, help="Markdown table output (default: --out with .md)")
    p.add_argument("--iters", type=nonnegative_int, default=3, help="DKM centroid updates")
    p.add_argument("--tau", type=positive_float, default=0.05, help="relative tau (x median squared centroid gap)")
    p.add_argument("--projections", type=positive_int, default=4, help="layers of --shape in the block (q, k, v, o)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="processes for the sharded configs (gloo)")
    p.add_argument("--extrapolate-ranks", type=int, nargs="+", default=[8], help="rank counts computed from measured shards")
    p.add_argument("--configs", default=None, help="subset of plain,save_on_cpu,M,M+U,M+S,M+U+S,fused,coremltools (default: all)")
    p.add_argument("--no-coreml", action="store_true", help="skip the coremltools reference (minutes)")
    p.add_argument("--per-projection", action="store_true", help="always measure one projection at a time")
    p.add_argument("--memory-limit-gib", type=positive_float, default=12.0, help="memory all processes of one measurement may use")
    p.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds per measurement process")
    p.set_defaults(func=cmd_bench)


BENCH_RUN_DIR = "runs/bench"  # benchmarks write here unless --out names another place


def add_commands(sub: Any) -> None:
    """Register every subcommand; a new one adds one line here (``add_<name>_parser(sub)``)."""
    add_compress_parser(sub)
    add_eval_parser(sub)
    add_generate_parser(sub)
    add_export_parser(sub)  # edkm export coreml (edkm.cli.export)
    bench = sub.add_parser("bench", help="benchmarks (results go to runs/bench/ unless --out says otherwise)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    add_bench_memory_parser(bench_sub)  # `edkm bench NAME` benchmarks register on bench_sub
    add_train_parser(bench_sub)  # edkm bench train
    add_bench_generate_parser(bench_sub)  # edkm bench generate
    add_compare_parser(sub)  # edkm compare
    add_plan_parser(sub)  # edkm plan
