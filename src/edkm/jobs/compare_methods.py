"""The rows of ``edkm compare``: how each method is built, its knob and its label.

Importing this module is light (no torch): builders import what they need when called.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    describe: Callable[[Any, int], str]  # (compare config, bits) -> label
    build: Callable[[Any, Any, Any, int | None], Any]  # (runner, plan, knob value, seed) -> LUT model
    trained: bool = False
    knob: str | None = None
    choices: Callable[[Any], list[Any]] = lambda cfg: [None]
    tune_like: str | None = None  # take the knob value this sibling method chose on validation

    def label(self, cfg: Any, bits: int) -> str:
        return self.describe(cfg, bits)

    def candidates(self, cfg: Any) -> list[Any]:
        return list(self.choices(cfg))


def _rtn(r: Any, plan: Any, group: bool) -> Any:
    # deferred: the builders import torch; importing this module stays light (module docstring)
    from edkm.peers.calibrate import quantize_layers_
    from edkm.peers.gptq import rtn_lut

    size = r.cfg.group_size if group else None
    return quantize_layers_(
        copy.deepcopy(r.model),
        plan,
        lambda n, m, _s: rtn_lut(m.weight, plan.for_module(n).bits, size if plan.for_module(n).bits <= 4 else None),
    )


def _kmeans(r: Any, plan: Any) -> Any:
    # deferred: the builders import torch; importing this module stays light (module docstring)
    from edkm.peers.baselines import ptq_kmeans_

    return ptq_kmeans_(copy.deepcopy(r.model), plan)


def _gptq(r: Any, plan: Any, damp: float, group: bool) -> Any:
    # deferred: the builders import torch; importing this module stays light (module docstring)
    from edkm.peers.gptq import gptq_

    return gptq_(copy.deepcopy(r.model), r.calib, plan, r.cfg.group_size if group else None, damp=damp)


def _squeeze(r: Any, plan: Any, per_row: bool) -> Any:
    # deferred: the builders import torch; importing this module stays light (module docstring)
    from edkm.peers.squeeze import squeeze_

    return squeeze_(copy.deepcopy(r.model), r.calib, plan, per_row=per_row)


def _awq(r: Any, plan: Any) -> Any:
    # deferred: the builders import torch; importing this module stays light (module docstring)
    from edkm.peers.awq import awq_

    return awq_(copy.deepcopy(r.model), r.calib, plan, r.cfg.group_size)


def _hqq(r: Any, plan: Any, group: bool) -> Any:
    # deferred: the builders import torch; importing this module stays light (module docstring)
    from edkm.peers.hqq import hqq_

    return hqq_(copy.deepcopy(r.model), plan, r.cfg.group_size if group else None)


def _coreml(r: Any, plan: Any, sensitive: bool, grouped: bool) -> Any:
    # deferred: the builders import torch; importing this module stays light (module docstring)
    from edkm.peers.coreml_palettizers import coreml_kmeans_, coreml_skm_

    rows = r.cfg.lut_rows if grouped else None
    if sensitive:
        return coreml_skm_(copy.deepcopy(r.model), r.calib, plan, rows)
    return coreml_kmeans_(copy.deepcopy(r.model), plan, rows)


def _rows(cfg: Any) -> str:
    return f"LUT per {cfg.lut_rows} output channels"


def format_knob(value: Any) -> str:
    """A knob value as the log and the table show it (a tuple knob as its parts).

    >>> format_knob(0.0003), format_knob((0.001, 0.2)), format_knob([0.001, 0.2])
    ('0.0003', '0.001, 0.2', '0.001, 0.2')
    """
    return ", ".join(f"{v:g}" for v in value) if isinstance(value, tuple | list) else f"{value:g}"


def edkm_grid(cfg: Any) -> list[tuple[float, float]]:
    """eDKM's (lr, starting tau) candidates: every lr at the default tau, every other tau at the middle lr.

    >>> from types import SimpleNamespace as C
    >>> edkm_grid(C(edkm_lrs=[5e-4, 1e-3, 2e-3], edkm_taus=[0.1], tau=0.2))
    [(0.0005, 0.2), (0.001, 0.2), (0.002, 0.2), (0.001, 0.1)]
    """
    middle = cfg.edkm_lrs[len(cfg.edkm_lrs) // 2]
    return [(lr, cfg.tau) for lr in cfg.edkm_lrs] + [(middle, t) for t in cfg.edkm_taus if t != cfg.tau]


def _edkm(r: Any, plan: Any, knob: tuple[float, float], seed: int, rows: int | None) -> Any:
    """eDKM at ``knob`` = (lr, starting tau); with ``rows``, one LUT per ``rows`` output channels where that divides a
    layer (else per tensor)."""
    # deferred: the builders import torch; importing this module stays light (module docstring)
    from edkm.transform import finalize_, palettize_, target_modules

    lr, tau = knob
    plan = replace(plan, tau=tau, tau_end=tau / r.cfg.tau_anneal)
    if rows:
        whole = {n: {"group_size": None} for n, m in target_modules(r.model, plan) if m.weight.shape[0] % rows}
        plan = replace(plan, group_size=rows, overrides={**plan.overrides, **whole})
    model = palettize_(copy.deepcopy(r.model), plan)
    r.finetune(model, lr, seed)
    return finalize_(model)


def _qat(r: Any, plan: Any, lr: float, seed: int) -> Any:
    # deferred: the builders import torch; importing this module stays light (module docstring)
    from edkm.peers.qat import convert_qat_, prepare_qat_, qat_to_lut_

    model = prepare_qat_(copy.deepcopy(r.model), plan, r.cfg.group_size)
    r.finetune(model, lr, seed)
    return qat_to_lut_(convert_qat_(model.eval()))


def _g(cfg: Any) -> str:
    return f"g{cfg.group_size}"


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("rtn", lambda c, b: f"RTN {b}-bit per channel", lambda r, p, v, s: _rtn(r, p, False)),
        Method("rtn_g", lambda c, b: f"RTN {b}-bit {_g(c)}", lambda r, p, v, s: _rtn(r, p, True)),
        Method("kmeans", lambda c, b: f"k-means {b}-bit per tensor (PTQ)", lambda r, p, v, s: _kmeans(r, p)),
        Method(
            "gptq",
            lambda c, b: f"GPTQ {b}-bit per channel, act-order",
            lambda r, p, v, s: _gptq(r, p, v, False),
            knob="damp",
            choices=lambda c: c.gptq_damps,
        ),
        Method(
            "gptq_g",
            lambda c, b: f"GPTQ {b}-bit {_g(c)}, act-order",
            lambda r, p, v, s: _gptq(r, p, v, True),
            knob="damp",
            choices=lambda c: c.gptq_damps,
        ),
        Method(
            "squeeze", lambda c, b: f"SqueezeLLM-style {b}-bit, LUT per row", lambda r, p, v, s: _squeeze(r, p, True)
        ),
        Method(
            "squeeze_tensor",
            lambda c, b: f"Fisher-weighted k-means {b}-bit per tensor",
            lambda r, p, v, s: _squeeze(r, p, False),
        ),
        Method(
            "coreml_kmeans",
            lambda c, b: f"coremltools PostTrainingPalettizer {b}-bit per tensor",
            lambda r, p, v, s: _coreml(r, p, False, False),
        ),
        Method(
            "coreml_kmeans_rows",
            lambda c, b: f"coremltools PostTrainingPalettizer {b}-bit, {_rows(c)}",
            lambda r, p, v, s: _coreml(r, p, False, True),
        ),
        Method(
            "coreml_skm",
            lambda c, b: f"coremltools SKMPalettizer {b}-bit per tensor",
            lambda r, p, v, s: _coreml(r, p, True, False),
        ),
        Method(
            "coreml_skm_rows",
            lambda c, b: f"coremltools SKMPalettizer {b}-bit, {_rows(c)}",
            lambda r, p, v, s: _coreml(r, p, True, True),
        ),
        Method("awq_g", lambda c, b: f"AWQ-style scaling + RTN {b}-bit {_g(c)}", lambda r, p, v, s: _awq(r, p)),
        Method("hqq", lambda c, b: f"HQQ {b}-bit per channel", lambda r, p, v, s: _hqq(r, p, False)),
        Method("hqq_g", lambda c, b: f"HQQ {b}-bit {_g(c)}", lambda r, p, v, s: _hqq(r, p, True)),
        Method(
            "qat_g",
            lambda c, b: f"torchao QAT int{b} {_g(c)}",
            lambda r, p, v, s: _qat(r, p, v, s),
            trained=True,
            knob="lr",
            choices=lambda c: c.qat_lrs,
        ),
        Method(
            "edkm",
            lambda c, b: f"eDKM {b}-bit per tensor",
            lambda r, p, v, s: _edkm(r, p, v, s, None),
            trained=True,
            knob="lr,tau",
            choices=edkm_grid,
        ),
        Method(
            "edkm_rows",
            lambda c, b: (
                f"eDKM {b}-bit, LUT per {c.lut_rows} output channels "
                f"(per tensor where {c.lut_rows} does not divide the rows)"
            ),
            lambda r, p, v, s: _edkm(r, p, v, s, r.cfg.lut_rows),
            trained=True,
            knob="lr,tau",
            choices=edkm_grid,
            tune_like="edkm",
        ),
    ]
}
