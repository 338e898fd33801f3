"""Zero-shot accuracy of every model a ``edkm compress`` run folder holds: the original, the post-training
baselines it saved and the eDKM model; resumable, one JSON entry per model.

``edkm bench zeroshot RUN --tasks piqa,arc_easy --data-dir ../shared/data --limit 100 --out result.json``
scores (and, for a saved file, reads its bits per weight), in this order, the original model named by the run's
settings, the post-training baselines (``rtn``, ``kmeans``, ``kmeans_aw``, ``gptq``, ``gptq_g128``, ``squeeze``:
``<name>.edkm.safetensors`` in the run folder, where present) and the packed eDKM folder itself. A model already
in ``--out`` with the same tasks, data and limit is skipped, so a stopped run continues where it was.

Example (a run folder is needed; see ``edkm compress``):
    >>> from edkm.bench.zeroshot import average
    >>> average({"piqa": {"acc": 0.5, "acc_norm": 0.75}, "winogrande": {"acc": 0.25, "acc_norm": None}})
    0.5
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from edkm.atomic import write_json

BASELINES = ("rtn", "kmeans", "kmeans_aw", "gptq", "gptq_g128", "squeeze")
FIELD_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")  # the LLM-QAT / GPTQ-era set


def average(tasks: dict[str, dict[str, Any]]) -> float:
    """Mean over tasks of acc_norm where the task has one (lm-eval's headline for PIQA, ARC, HellaSwag), else acc."""
    scores = [r["acc_norm"] if r.get("acc_norm") is not None else r["acc"] for r in tasks.values()]
    return sum(scores) / len(scores)


def run_models(run: Path) -> list[tuple[str, str, str | None]]:
    """(name, what to load, tokenizer folder) of every model in the run folder, original first."""
    # deferred: the CLI parser imports this module (FIELD_TASKS), and edkm.export imports torch
    from edkm.export.files import SETTINGS_FILE
    from edkm.models import BUNDLED_MODEL_DIR

    settings = json.loads((run / SETTINGS_FILE).read_text())
    original = settings.get("model") or str(BUNDLED_MODEL_DIR)  # a folder, a file or a known name (smollm2-135m)
    models: list[tuple[str, str, str | None]] = [("original", original, None)]
    models += [(n, str(run / f"{n}.edkm.safetensors"), str(run)) for n in BASELINES]
    models = [m for m in models if m[0] == "original" or Path(m[1]).is_file()]
    return [*models, ("edkm", str(run), None)]


def packed_bits(model: Any, weights: Path) -> dict[str, Any]:
    """:func:`~edkm.peers.measure.bits_per_weight` of a packed file; an edkm folder's weights (Hugging Face
    layout) are written once as the single packed file to be read the same way."""
    # deferred: torch and safetensors
    from edkm.export.format import save_palettized
    from edkm.peers.measure import bits_per_weight

    if weights.name.endswith(".edkm.safetensors"):
        return bits_per_weight(weights)
    with tempfile.TemporaryDirectory() as tmp:
        save_palettized(model, Path(tmp) / "model.edkm.safetensors")
        return bits_per_weight(Path(tmp) / "model.edkm.safetensors")


def run_zeroshot_benchmark(
    run: str | Path,
    tasks: list[str],
    data_dir: str | None,
    limit: int | None,
    out: str | Path,
    models: list[str] | None = None,
) -> dict[str, Any]:
    """Score each model of ``run`` (or the named ``models`` of it) on ``tasks`` (see the module docstring); the
    result, also written to ``out``."""
    # deferred: torch and transformers load only when the benchmark runs
    from edkm.eval.zeroshot import evaluate_tasks
    from edkm.jobs.runfolder import load_model, locate

    run, out = Path(run), Path(out)
    protocol = {"tasks": tasks, "data_dir": data_dir, "limit": limit, "run": str(run)}
    result = json.loads(out.read_text()) if out.is_file() else {}
    if result.get("protocol") != protocol:
        result = {"protocol": protocol, "models": {}}
    present = run_models(run)
    unknown = sorted(set(models or []) - {name for name, _, _ in present})
    if unknown:
        raise ValueError(f"{run} holds no model {', '.join(unknown)}; it holds {', '.join(n for n, _, _ in present)}")
    for name, source, tokenizer in present:
        if name in result["models"] or (models and name not in models):
            continue
        start = time.perf_counter()
        model, tok = load_model(source, tokenizer)
        scores = evaluate_tasks(model.eval(), tok, tasks, data_dir=data_dir, limit=limit)
        result["models"][name] = {
            "tasks": scores,
            "average": average(scores),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if name != "original":  # bits per weight read from the saved file, per bit width (embedding/head apart)
            result["models"][name]["bits_per_weight"] = packed_bits(model, locate(source).weights)
        write_json(out, result)  # after each model: a stopped run resumes from here
        print(f"{name}: average {result['models'][name]['average']:.4f}", flush=True)
    return result


__all__ = ["BASELINES", "FIELD_TASKS", "average", "packed_bits", "run_models", "run_zeroshot_benchmark"]
