"""``edkm eval`` (perplexity, zero-shot tasks) and ``edkm generate``, on any model the command line names."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edkm.cli.options import add_device_argument
from edkm.cli.validate import check_eval, fraction, nonnegative_float, positive_int, top_p


def cmd_eval(args: argparse.Namespace) -> None:
    check_eval(args)
    # deferred: torch and transformers load only when the command runs
    from edkm.data.text import load_text, split_text, tokenize_text
    from edkm.distributed.device import resolve_device
    from edkm.eval.perplexity import perplexity
    from edkm.eval.zeroshot import TASKS, evaluate_tasks
    from edkm.jobs.runfolder import load_model

    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else []
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    model, tok = load_model(args.model, args.tokenizer)
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
    import torch  # deferred: building the parser must not import torch

    from edkm.distributed.device import resolve_device
    from edkm.eval.generate import generate_text
    from edkm.jobs.runfolder import load_model

    model, tok = load_model(args.model, args.tokenizer)
    model.to(resolve_device(args.device))
    torch.manual_seed(args.seed)
    sampling = (
        {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
        if args.temperature > 0
        else {"do_sample": False}
    )
    print(generate_text(model, tok, args.prompt, args.max_new_tokens, **sampling))


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity on a text file and/or zero-shot tasks")
    p.add_argument("model", help="run folder (edkm compress --out), packed .safetensors file or Hugging Face folder")
    p.add_argument(
        "--tokenizer", help="tokenizer folder (default: the model's own; required for a packed file without one)"
    )
    p.add_argument("--text", help="plain-text file for perplexity")
    p.add_argument(
        "--holdout",
        type=fraction,
        default=None,
        help="score only the last fraction of --text, as compress holds it out, e.g. 0.2 (default: all of it)",
    )
    p.add_argument("--context", type=positive_int, default=256, help="tokens per perplexity window")
    p.add_argument(
        "--tasks",
        help="comma-separated zero-shot tasks: piqa, arc_easy, arc_challenge, winogrande, "
        "hellaswag, boolq, openbookqa, social_i_qa",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="task files (default: the bundled 50-item subsets)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N items of each task (default: all)")
    add_device_argument(p)
    p.set_defaults(func=cmd_eval)


def add_generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="sample from a model")
    p.add_argument("model", help="run folder (edkm compress --out), packed .safetensors file or Hugging Face folder")
    p.add_argument(
        "--tokenizer", help="tokenizer folder (default: the model's own; required for a packed file without one)"
    )
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start of a story)")
    p.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to generate")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=top_p, default=0.9, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_device_argument(p)
    p.set_defaults(func=cmd_generate)
