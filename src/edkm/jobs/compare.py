"""`edkm compare`: eDKM against the methods users would pick instead, under one honest protocol.

Protocol (bundled model and text unless ``--model/--text``): the text is split into train (first
80 %), validation (next 10 %) and test (last 10 %) as ``edkm compress`` splits it. Calibration data
of the post-training peers comes from the training split. Every knob (GPTQ dampening, learning rates
of the trained methods) is chosen on validation; test is evaluated once per final configuration, on
the saved and reloaded file. Trained methods (eDKM, torchao QAT) get the same budget: steps, batch,
data order, distillation teacher (the fine-tuned fp control of the same seed) and warmup + cosine
schedule; they are repeated over ``--seeds`` (mean and std of test perplexity). Every row records
its bits per weight of the quantized decoder layers (indices + LUTs / scales / zero points) read
from the saved file. Results: ``<out>/compare_<b>bit.json`` (rewritten after every row).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edkm.atomic import atomic_path, write_json
from edkm.config import PalettizeConfig
from edkm.eval.perplexity import perplexity
from edkm.export import save_palettized
from edkm.hf.load import load_palettized
from edkm.jobs.compare_methods import METHODS, Method, format_knob
from edkm.jobs.compress import CompressConfig, split_data
from edkm.jobs.runtime import run_environment
from edkm.models import load_causal_lm
from edkm.peers.fast import calibration
from edkm.peers.measure import bits_per_weight
from edkm.training.finetune import finetune
from edkm.training.loop import TrainConfig

DEFAULT_METHODS = tuple(METHODS)


@dataclass
class CompareConfig:
    bits: list[int] = field(default_factory=lambda: [3, 4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    steps: int = 300
    batch_size: int = 16
    context: int = 256
    control_lr: float = 5e-4
    edkm_lrs: list[float] = field(default_factory=lambda: [5e-4, 1e-3, 2e-3])
    edkm_taus: list[float] = field(default_factory=lambda: [0.1, 0.4])  # tried at the middle lr (a cross-shaped grid)
    qat_lrs: list[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4, 1e-3, 2e-3])
    tau: float = 0.2  # starting tau; annealed to tau / tau_anneal
    tau_anneal: float = 100.0
    distill: float = 1.0
    group_size: int = 32  # input columns per scale of the uniform peers (g128 does not fit 64-wide layers)
    lut_rows: int = 16  # output channels per LUT of the per-group eDKM row
    gptq_damps: list[float] = field(default_factory=lambda: [0.01, 0.1])
    calib: int = 32
    embed_bits: int = 8
    model: str | None = None
    text: str | None = None
    out: str = "benchmarks/results"
    work: str = "runs/compare"
    resume: bool = False


def _summary(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


class Runner:
    """Shared state of one comparison: model, splits, calibration, controls (one per seed)."""

    def __init__(self, cfg: CompareConfig) -> None:
        self.cfg = cfg
        torch.manual_seed(0)
        self.model, self.tokenizer = load_causal_lm(cfg.model)
        self.data, self.val, self.test = split_data(CompressConfig(text=cfg.text, context=cfg.context), self.tokenizer)
        self.calib = calibration(self.data, cfg.calib)
        self.work = Path(cfg.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._controls: dict[int, Any] = {}

    def ppl(self, model: Any, split: str) -> float:
        return perplexity(model, self.val if split == "val" else self.test, context=self.cfg.context)

    def train_config(self, lr: float, seed: int) -> Any:
        """Training settings of the shared budget (eDKM's tau schedule is in its PalettizeConfig)."""
        c = self.cfg
        return TrainConfig(steps=c.steps, batch_size=c.batch_size, lr=lr, seed=seed, progress=False, checkpoint_every=0)

    def control(self, seed: int) -> Any:
        """The fp model fine-tuned at ``control_lr`` with ``seed`` (cached on disk): the teacher and the fp row."""
        if seed not in self._controls:
            c = self.cfg
            path = (
                self.work / f"control_seed{seed}_steps{c.steps}_bs{c.batch_size}_lr{c.control_lr:g}_ctx{c.context}.pt"
            )
            model = copy.deepcopy(self.model)
            if path.is_file():
                model.load_state_dict(torch.load(path, weights_only=True))
            else:
                finetune(model, self.data, self.train_config(c.control_lr, seed), None, False)
                with atomic_path(path) as tmp:
                    torch.save(model.state_dict(), tmp)
            self._controls[seed] = model.eval().requires_grad_(False)
        return self._controls[seed]

    def finetune(self, model: Any, lr: float, seed: int) -> list[float]:
        teacher = self.control(seed) if self.cfg.distill else None
        return finetune(model, self.data, self.train_config(lr, seed), None, False, teacher, self.cfg.distill)

    def save_and_reload(self, model: Any, path: Path) -> tuple[Any, dict[str, Any]]:
        save_palettized(model, path)
        return load_palettized(path).eval(), bits_per_weight(path)


def run_method(
    r: Runner, method: Method, bits: int, log: Callable[[str], None], inherited: Any = None
) -> dict[str, Any]:
    """Tune ``method``'s knob on validation (first seed), then run every seed of the chosen value and test it.

    ``inherited``: the value a sibling method chose on validation (``Method.tune_like``), used instead of a grid.
    """
    cfg = r.cfg
    plan = PalettizeConfig(
        bits=bits, tau=cfg.tau, overrides={"embed_tokens|lm_head": {"bits": cfg.embed_bits, "group_size": None}}
    )
    candidates = [inherited] if inherited is not None else method.candidates(cfg)
    seeds = cfg.seeds if method.trained else [None]
    tuning, built = [], {}
    for value in candidates:
        model = method.build(r, plan, value, seeds[0])
        score = r.ppl(model, "val")
        tuning.append({"value": value, "val_ppl": score})
        built[value] = model
        knob = f" {method.knob}={format_knob(value)}" if method.knob else ""
        log(
            f"  {bits}-bit {method.name}{knob}" + (f" seed={seeds[0]}" if method.trained else "") + f": val {score:.4f}"
        )
    best = min(tuning, key=lambda t: t["val_ppl"])["value"]
    test_ppls, val_ppls, info = [], [], {}
    for seed in seeds:
        model = built.pop(best) if seed == seeds[0] else method.build(r, plan, best, seed)
        tag = f"{method.name}" + (f"_seed{seed}" if seed is not None else "")
        loaded, info = r.save_and_reload(model, r.work / f"{bits}bit" / f"{tag}.edkm.safetensors")
        val_ppls.append(r.ppl(loaded, "val"))
        test_ppls.append(r.ppl(loaded, "test"))
        log(
            f"  {bits}-bit {method.name}"
            + (f" seed={seed}" if method.trained else "")
            + f": test {test_ppls[-1]:.4f} ({info[str(bits)]:.3f} bits/weight)"
        )
    mean, std = _summary(test_ppls)
    return {
        "method": method.name,
        "label": method.label(cfg, bits),
        "kind": "trained" if method.trained else "post-training",
        "knob": method.knob,
        "chosen": best,
        "tuning": tuning if len(candidates) > 1 else [],
        "tuned_like": method.tune_like if inherited is not None else None,
        "bpw": info[str(bits)],
        "embed_bpw": info.get(str(cfg.embed_bits)),
        "file_bytes": info["file_bytes"],
        "val_ppl": statistics.fmean(val_ppls),
        "test_ppl": mean,
        "test_ppl_std": std,
        "test_ppls": test_ppls,
        "seeds": seeds if method.trained else None,
    }


def _inherited(method: Method, rows: list[dict[str, Any]]) -> Any:
    """The knob value ``method.tune_like`` chose on validation (a tuple again after a JSON round trip)."""
    row = next((row for row in rows if row["method"] == method.tune_like), None) if method.tune_like else None
    if row is None:
        return None
    return tuple(row["chosen"]) if isinstance(row["chosen"], list) else row["chosen"]


def targets(rows: list[dict[str, Any]], bits: int) -> dict[str, Any]:
    """eDKM per tensor vs every peer at <= bits + 0.25 bits per weight, on test."""
    ours = next((row for row in rows if row["method"] == "edkm"), None)
    if ours is None:
        return {"checked": False, "why": "eDKM per tensor was not run"}
    limit = bits + 0.25
    peers = [row for row in rows if not row["method"].startswith(("edkm", "fp")) and row["bpw"] <= limit]
    lost = [row["method"] for row in peers if row["test_ppl"] <= ours["test_ppl"]]
    return {
        "checked": True,
        "limit_bpw": limit,
        "edkm_test_ppl": ours["test_ppl"],
        "peers_within_limit": [row["method"] for row in peers],
        "lost_to": lost,
        "met": not lost,
    }


def compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> dict[int, dict[str, Any]]:
    """Run the comparison for every bit width; returns and writes ``compare_<b>bit.json``."""
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    start = time.perf_counter()
    r = Runner(cfg)  # loads the model: after the cheap checks
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fp_row = None
    results = {}
    for bits in cfg.bits:
        path = out / f"compare_{bits}bit.json"
        old = json.loads(path.read_text()) if cfg.resume and path.is_file() else {}
        rows = [row for row in old.get("rows", []) if _reusable(row, old.get("config", {}), cfg)]
        trained = any(METHODS[m].trained for m in cfg.methods)
        if fp_row is None or (trained and fp_row.get("control_test_ppl") is None):
            kept = next((row for row in rows if row["method"] == "fp"), None)
            fp_row = kept if kept and (kept.get("control_test_ppl") is not None or not trained) else fp_rows(r, trained)
        rows = [fp_row] + [row for row in rows if row["method"] != "fp"]
        report = {
            "bits": bits,
            "model": cfg.model or "bundled:stories260K",
            "config": asdict(cfg),
            "protocol": protocol(r),
            "environment": run_environment(),
            "rows": rows,
        }
        for name in cfg.methods:
            if any(row["method"] == name for row in rows):
                continue
            log(f"{bits}-bit {name} ...")
            rows.append(run_method(r, METHODS[name], bits, log, _inherited(METHODS[name], rows)))
            report["targets"] = targets(rows, bits)
            report["not_run"] = [m for m in METHODS if not any(row["method"] == m for row in rows)]
            report["seconds"] = round(time.perf_counter() - start, 1)
            write_json(path, report)
        report["targets"] = targets(rows, bits)
        report["not_run"] = [m for m in METHODS if not any(row["method"] == m for row in rows)]
        write_json(path, report)
        results[bits] = report
    return results


PTQ_FIELDS = ("group_size", "gptq_damps", "calib", "embed_bits", "lut_rows", "model", "text", "context")


def _reusable(row: dict[str, Any], old: dict[str, Any], cfg: CompareConfig) -> bool:
    """A row of an earlier run that this configuration would compute identically (``--resume``)."""
    new = asdict(cfg)
    if row["kind"] == "post-training":
        return all(old.get(k) == new[k] for k in PTQ_FIELDS)
    ignore = {"bits": None, "methods": None, "resume": None}
    return {**old, **ignore} == {**new, **ignore}


def fp_rows(r: Runner, controls: bool = True) -> dict[str, Any]:
    """The fp reference and (when trained methods run) the fine-tuned controls, one per seed, as one row."""
    row = {
        "method": "fp",
        "label": "fp32 original / fine-tuned control",
        "kind": "reference",
        "bpw": 32.0,
        "val_ppl": r.ppl(r.model, "val"),
        "test_ppl": r.ppl(r.model, "test"),
        "control_test_ppl": None,
        "seeds": None,
    }
    if controls:
        tests = [r.ppl(r.control(s), "test") for s in r.cfg.seeds]
        mean, std = _summary(tests)
        row.update(
            control_test_ppl=mean,
            control_test_ppl_std=std,
            control_test_ppls=tests,
            seeds=r.cfg.seeds,
            control_val_ppl=statistics.fmean(r.ppl(r.control(s), "val") for s in r.cfg.seeds),
        )
    return row


def protocol(r: Runner) -> dict[str, Any]:
    c = r.cfg
    return {
        "splits": "text -> train (first 80 %), validation (next 10 %), test (last 10 %); "
        "knobs chosen on validation, test once per final configuration",
        "train_sequences": len(r.data),
        "val_tokens": int(r.val.numel()),
        "test_tokens": int(r.test.numel()),
        "calibration": f"{c.calib} training sequences of {c.context + 1} tokens",
        "seeds": c.seeds,
        "budget": f"{c.steps} steps x {c.batch_size} sequences of {c.context} tokens, "
        "warmup 20 + cosine, distilled from the seed's control",
        "bpw": "stored bits of the quantized decoder layers (packed indices + LUTs / scales / zero points) "
        "per weight, from the saved file",
        "embedding": f"tied embedding / output layer at {c.embed_bits} bits in every row",
    }
