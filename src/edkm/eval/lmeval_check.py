"""Our zero-shot scorer against lm-evaluation-harness itself, on the same in-memory model and items.

lm-eval (``pip install 'edkm[lmeval]'``) scores through its own ``HFLM`` (tokenization, batching, log-softmax)
and its own metrics, from task YAMLs written here over our normalized JSONL (``{"context", "choices",
"label"}`` per line, see ``edkm.eval.zeroshot_data``): ``dataset_path: json``, so nothing is downloaded. The
prompts are lm-eval's: PIQA's and ARC's YAML templates, WinoGrande through lm-eval's own
``preprocess_winogrande`` functions (partial scoring), HellaSwag through lm-eval's ``preprocess``; the one step
lm-eval cannot do on llama.cpp's HellaSwag text, recovering ``ctx_b.capitalize()``, is ours
(``edkm.eval.zeroshot_tasks``). :func:`crosscheck` returns, per task, both sides' acc / acc_norm and the largest
difference between the two log-likelihoods of each (item, choice).

Example (lm-eval installed; seconds on the bundled model)::

    from edkm.eval.lmeval_check import crosscheck
    from edkm.models import load_causal_lm
    model, tok = load_causal_lm(None)
    crosscheck(model, tok, ["piqa", "winogrande"], limit=10)["piqa"]["max_abs_ll_diff"]  # ~1e-5
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from edkm.eval.zeroshot import _argmax, load_task, loglikelihoods, save_jsonl, task_metrics, task_requests

CHECKED = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")

_TEMPLATES = {  # lm-eval's own doc_to_text / doc_to_choice of each task, over our fields
    "piqa": ('"Question: {{context}}\\nAnswer:"', '"{{choices}}"', "label"),
    "arc_easy": ('"Question: {{context}}\\nAnswer:"', '"{{choices}}"', "label"),
    "arc_challenge": ('"Question: {{context}}\\nAnswer:"', '"{{choices}}"', "label"),
    "hellaswag": ('"{{query}}"', "choices", "label"),
    "winogrande": ("!function utils.doc_to_text", "!function utils.doc_to_choice", "!function utils.doc_to_target"),
}
_UTILS = """
from lm_eval.tasks.hellaswag.utils import preprocess
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text
from edkm.eval.zeroshot_tasks import _hellaswag_query


def hellaswag_docs(dataset):
    return dataset.map(lambda d: {"query": preprocess(_hellaswag_query(d["context"])),
                                  "choices": [preprocess(c) for c in d["choices"]]})


def winogrande_docs(dataset):
    return dataset.map(lambda d: {"sentence": d["context"], "option1": d["choices"][0], "option2": d["choices"][1],
                                  "answer": str(d["label"] + 1)})
"""


def write_tasks(folder: Path, tasks: list[str], data_dir: Path | None, limit: int | None) -> None:
    """Task YAMLs ``edkm_<task>`` (and their ``utils.py``) over the first ``limit`` items of each task."""
    (folder / "utils.py").write_text(_UTILS)
    for task in tasks:
        save_jsonl(load_task(task, data_dir, limit), folder / f"{task}.jsonl")
        text, choice, target = _TEMPLATES[task]
        docs = {"hellaswag": "process_docs: !function utils.hellaswag_docs\n",
                "winogrande": "process_docs: !function utils.winogrande_docs\n"}.get(task, "")  # fmt: skip
        metrics = "  - metric: acc\n" + ("  - metric: acc_norm\n" if task != "winogrande" else "")
        (folder / f"{task}.yaml").write_text(
            f"task: edkm_{task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {folder / f'{task}.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n{docs}"
            f"doc_to_text: {text}\ndoc_to_choice: {choice}\ndoc_to_target: {target}\nmetric_list:\n{metrics}"
        )


def crosscheck(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str] | tuple[str, ...] = CHECKED,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, Any]]:
    """Per task: ``ours`` and ``lm_eval`` ({acc, acc_norm, n}), ``max_abs_ll_diff`` over every (item, choice) and
    ``items_differing`` (items whose argmax differs: none unless two choices score within that difference)."""
    import lm_eval  # deferred: the optional lm-eval extra
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data_dir = Path(data_dir) if data_dir else None
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(Path(tmp), list(tasks), data_dir, limit)
        lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
        theirs = lm_eval.simple_evaluate(
            model=lm, tasks=[f"edkm_{t}" for t in tasks], task_manager=TaskManager(include_path=tmp),
            log_samples=True, num_fewshot=0,
        )  # fmt: skip
    out = {}
    for task in tasks:
        docs = load_task(task, data_dir, limit)
        samples = sorted(theirs["samples"][f"edkm_{task}"], key=lambda s: s["doc_id"])
        their_ll = [float(r[0][0]) for s in samples for r in s["resps"]]
        requests = [r for d in docs for r in task_requests(task, d)]
        our_ll = loglikelihoods(model, tokenizer, requests, batch_size)
        ours = task_metrics(task, docs, our_ll)
        metrics = theirs["results"][f"edkm_{task}"]
        diffs = [abs(a - b) for a, b in zip(our_ll, their_ll)]
        pos, differing = 0, 0
        for d in docs:
            n = len(d.choices)
            differing += _argmax(our_ll[pos : pos + n]) != _argmax(their_ll[pos : pos + n])
            pos += n
        out[task] = {
            "ours": {k: ours[k] for k in ("acc", "acc_norm", "acc_stderr", "n")},
            "lm_eval": {
                "acc": metrics["acc,none"],
                "acc_norm": metrics.get("acc_norm,none"),
                "acc_stderr": metrics.get("acc_stderr,none"),
                "n": len(samples),
            },
            "requests": len(requests),
            "same_requests": len(their_ll) == len(requests),
            "max_abs_ll_diff": max(diffs),
            "items_differing": differing,
        }
    return out


def summary(result: dict[str, dict[str, Any]]) -> str:
    """One line per task: both acc / acc_norm and the log-likelihood difference."""
    return "\n".join(
        f"{t}: acc {r['ours']['acc']:.3f} / {r['lm_eval']['acc']:.3f}, acc_norm {r['ours']['acc_norm']} / "
        f"{r['lm_eval']['acc_norm']}, max |ll diff| {r['max_abs_ll_diff']:.2e}, n {r['ours']['n']}"
        for t, r in result.items()
    )


__all__ = ["CHECKED", "crosscheck", "summary", "write_tasks"]
