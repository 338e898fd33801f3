"""``edkm bench NAME``: the benchmarks (memory, train, generate, sharded-dkm, plan-check, kernels,
zeroshot); JSON results.

Building the parsers imports nothing heavy: each benchmark's module loads when it runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from edkm.bench.generate import CONFIGS, DEFAULT_CONFIGS, MODELS
from edkm.bench.train import DEFAULT_ROWS, ROWS
from edkm.bench.zeroshot import FIELD_TASKS
from edkm.cli.options import BENCH_RUN_DIR
from edkm.cli.validate import bits, nonnegative_int, positive_float, positive_int


def cmd_bench_memory(args: argparse.Namespace) -> None:
    from edkm.bench import run_memory_benchmark  # deferred: torch

    run_memory_benchmark(args)


def add_bench_memory_parser(bench: Any) -> None:
    p = bench.add_parser("memory", help="what DKM holds for backward under each eDKM memory technique")
    p.add_argument(
        "--shape", type=positive_int, nargs=2, default=[4096, 4096], help="rows and columns of each projection"
    )
    p.add_argument("--bits", type=bits, default=3, help="bits per clustered weight")
    p.add_argument(
        "--out",
        default=BENCH_RUN_DIR + "/memory.json",
        help="JSON output; the committed results are updated only with --out benchmarks/results/memory.json",
    )
    p.add_argument("--md", default=None, help="Markdown table output (default: --out with .md)")
    p.add_argument("--iters", type=nonnegative_int, default=3, help="DKM centroid updates")
    p.add_argument("--tau", type=positive_float, default=0.05, help="relative tau (x median squared centroid gap)")
    p.add_argument("--projections", type=positive_int, default=4, help="layers of --shape in the block (q, k, v, o)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="processes for the sharded configs (gloo)")
    p.add_argument(
        "--extrapolate-ranks", type=int, nargs="+", default=[8], help="rank counts computed from measured shards"
    )
    p.add_argument(
        "--configs", default=None, help="subset of plain,save_on_cpu,M,M+U,M+S,M+U+S,fused,coremltools (default: all)"
    )
    p.add_argument("--no-coreml", action="store_true", help="skip the coremltools reference (minutes)")
    p.add_argument("--per-projection", action="store_true", help="always measure one projection at a time")
    p.add_argument(
        "--memory-limit-gib", type=positive_float, default=12.0, help="memory all processes of one measurement may use"
    )
    p.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds per measurement process")
    p.set_defaults(func=cmd_bench_memory)


def cmd_bench_generate(args: Any) -> None:
    from edkm.bench.generate import format_markdown, run_generate_benchmark  # deferred: torch

    result = run_generate_benchmark(args)
    print(format_markdown(result))


def add_generate_parser(bench_sub: Any) -> None:
    """Register ``edkm bench generate`` on the ``bench`` subparsers (no heavy imports)."""
    p = bench_sub.add_parser("generate", help="batch-1 generation speed, memory and load time: dense vs packed")
    p.add_argument(
        "--out",
        default="runs/bench/generate.json",
        help="JSON output (the committed results: --out benchmarks/results/generate.json)",
    )
    p.add_argument("--md", default=None, help="Markdown table output (default: --out with .md)")
    p.add_argument("--readme", default=None, help="also replace the <!-- generate table --> section of this README")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--work-dir", default="runs/bench/generate-models", help="where the prepared models are kept")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (prefill tokens/s)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated (decode tokens/s)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts, each row measured at each")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every row (best reported)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    p.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the per-shape kernel profile (dense vs packed ms per Linear, interleaved)",
    )
    p.set_defaults(func=cmd_bench_generate)


def cmd_bench_train(args: Any) -> None:
    from edkm.bench.train import run_train_benchmark  # deferred: torch

    run_train_benchmark(args)


def add_train_parser(bench_sub: Any) -> None:
    """``edkm bench train`` (parser only; no torch import)."""
    p = bench_sub.add_parser("train", help="whole training steps: plain fine-tuning vs eDKM vs coremltools")
    p.add_argument(
        "--model",
        default=None,
        help="a real model (HF folder, .gguf file or smollm2-135m) instead of random LLaMA weights; its config "
        "replaces --hidden/--intermediate/--heads/--layers/--vocab",
    )
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=None, help="default: LLaMA's rule (11008 at hidden 4096)")
    p.add_argument("--heads", type=int, default=None, help="default: hidden / 128")
    p.add_argument("--layers", type=int, default=1, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--embed-bits", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (median)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument(
        "--coreml-shape", type=int, nargs=2, default=[2048, 2048], help="the layer coremltools is measured on"
    )
    p.add_argument("--out", default="runs/bench/train.json", help="JSON result (Markdown table beside it)")
    p.add_argument("--readme", default=None, help="also rewrite the <!-- train table --> section of this file")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto = CUDA when present (then peaks are CUDA allocator bytes; the CUDA path is untested)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    p.set_defaults(func=cmd_bench_train)


def cmd_sharded_dkm(args: Any) -> None:
    from edkm.bench.sharded_dkm import markdown, run  # deferred: torch

    print(markdown(run(tuple(args.shape), args.bits, args.iters, tuple(args.ranks), args.repeats, args.out)))


def add_sharded_dkm_parser(bench_sub: Any) -> None:
    p = bench_sub.add_parser("sharded-dkm", help="DKM on the gathered weight vs sharded DKM, 1-4 gloo processes")
    p.add_argument("--shape", type=positive_int, nargs=2, default=[4096, 4096])
    p.add_argument("--bits", type=bits, default=3)
    p.add_argument("--iters", type=nonnegative_int, default=3)
    p.add_argument("--ranks", type=positive_int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--out", default="benchmarks/results/fsdp_dkm.json")
    p.set_defaults(func=cmd_sharded_dkm)


def cmd_plan_check(args: Any) -> None:
    from edkm.bench.plan_check import run, table  # deferred: torch

    print(table(run(args.out)))


def add_plan_check_parser(bench_sub: Any) -> None:
    p = bench_sub.add_parser("plan-check", help="edkm plan's estimate against measured peaks of small models")
    p.add_argument("--out", default="benchmarks/results/plan_validation.json")
    p.set_defaults(func=cmd_plan_check)


def cmd_bench_kernels(args: Any) -> None:
    from edkm.atomic import write_json, write_text  # deferred: torch and the native kernel's build
    from edkm.bench.kernels import markdown, result, run

    doc = result(run(tokens=args.tokens, cold_mib=args.cold_mib, rounds=args.rounds), args.tokens, args.cold_mib)
    write_json(args.out, doc)
    write_text(str(args.out).removesuffix(".json") + ".md", markdown(doc) + "\n")
    print(markdown(doc))


def add_kernels_parser(bench_sub: Any) -> None:
    p = bench_sub.add_parser("kernels", help="native LUT GEMV vs dense fp32, per layer shape, one thread")
    p.add_argument("--tokens", type=positive_int, default=1, help="tokens per call (1 = batch-1 decode)")
    p.add_argument("--cold-mib", type=positive_int, default=1024, help="weight copies rotated in the cold regime")
    p.add_argument("--rounds", type=positive_int, default=5, help="best of this many rounds")
    p.add_argument("--out", default=BENCH_RUN_DIR + "/kernels.json", help="JSON (Markdown beside it)")
    p.set_defaults(func=cmd_bench_kernels)


def cmd_bench_zeroshot(args: Any) -> None:
    from edkm.bench.zeroshot import run_zeroshot_benchmark  # deferred: torch and transformers

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    run_zeroshot_benchmark(args.run, tasks, args.data_dir, args.limit, args.out, models)


def add_zeroshot_parser(bench_sub: Any) -> None:
    p = bench_sub.add_parser("zeroshot", help="zero-shot accuracy of every model in an edkm compress run folder")
    p.add_argument("run", help="run folder of edkm compress (--out)")
    p.add_argument("--tasks", default=",".join(FIELD_TASKS), help="comma-separated tasks (see edkm eval --tasks)")
    p.add_argument("--data-dir", default=None, help="full task files, e.g. ../shared/data (default: bundled subsets)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N items of each task (default: all)")
    p.add_argument("--out", default=BENCH_RUN_DIR + "/zeroshot.json", help="JSON result; resumes a stopped run")
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of original,rtn,kmeans,kmeans_aw,gptq,gptq_g128,"
        "squeeze,edkm (default: every model the run folder holds)",
    )
    p.set_defaults(func=cmd_bench_zeroshot)


def add_bench_parser(sub: Any) -> None:
    """Register ``edkm bench`` and its benchmarks."""
    bench = sub.add_parser("bench", help="benchmarks (results go to runs/bench/ unless --out says otherwise)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    add_bench_memory_parser(bench_sub)
    add_train_parser(bench_sub)
    add_generate_parser(bench_sub)
    add_sharded_dkm_parser(bench_sub)
    add_plan_check_parser(bench_sub)
    add_kernels_parser(bench_sub)
    add_zeroshot_parser(bench_sub)
