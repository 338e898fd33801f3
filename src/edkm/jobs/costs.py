"""What each phase of ``edkm compress`` costs, in training tokens of plain fine-tuning: the ETA's weights.

Only the ratios matter (the ETA rescales them by the measured pace); fitted to the SmolLM2-135M runs.

Example:
    >>> from edkm.jobs.compress import CompressConfig
    >>> costs = job_costs(CompressConfig(), heldout_tokens=16_384)
    >>> sorted(costs), costs["fp control"] == 300 * 16 * 256
    (['baselines', 'eDKM', 'evaluation', 'export', 'fp control'], True)
"""

from __future__ import annotations

from typing import Any

from edkm.config import PalettizeConfig

SCORED_TOKEN = 0.43  # cost of scoring a held-out token, in training tokens without clustering (job_costs)


def baseline_shares(cfg: Any, heldout_tokens: int) -> list[float]:
    """The cost of each of the baselines phase's 9 units, in :func:`job_costs`' units: the fp evaluation, RTN
    built and scored, k-means built and scored, then the calibrated peers (activation-aware k-means, GPTQ per
    channel and g128, Fisher-weighted k-means), each calibrated on 32 training sequences
    (:func:`edkm.peers.fast.calibration`) and scored. Fitted to the SmolLM2-135M 4-bit run (2 threads): 0.6, 1.6,
    1.0 and 1.0 of a calibration token for the calibrations, where a scored token costs ``SCORED_TOKEN`` (an
    evaluation took ~57 s, the peers 34 s, 108 s, 64 s and 66 s besides theirs)."""
    e, c = SCORED_TOKEN * heldout_tokens, 32 * cfg.context
    return [e, 0.02 * e, e, 0.1 * e, e, e + 0.6 * c, e + 1.6 * c, e + 1.0 * c, e + 1.0 * c]


def job_costs(cfg: Any, heldout_tokens: int) -> dict[str, float]:
    """Estimated cost of each phase in training tokens (only the ratios matter: the ETA rescales
    them by the measured pace). Fitted to the phase times of the SmolLM2-135M runs (2 threads;
    benchmarks/results/smollm2_*bit.json): scoring a token costs ``SCORED_TOKEN`` (0.43) of training on it without
    clustering, an eDKM token ~1.7 (12.5 and 10.4 ms per token at 3 and 4 bits, a scored token ~3 ms); the
    baselines as :func:`baseline_shares`. Before the first fit
    (6 evaluations, calibration not counted) the ETA after the baselines said 2:51 h for what took 23 min."""
    step, evaluation = cfg.train.batch_size * cfg.context, SCORED_TOKEN * heldout_tokens
    return {
        "baselines": sum(baseline_shares(cfg, heldout_tokens)),
        "fp control": cfg.train.steps * step if cfg.fp_control else 0.0,
        "eDKM": edkm_token_cost(cfg.plan) * cfg.train.steps * step,
        "export": 0.05 * evaluation,
        "evaluation": 1.1 * evaluation,
    }


def edkm_token_cost(plan: PalettizeConfig) -> float:
    """An eDKM training token's cost in tokens of plain fine-tuning, by LUT granularity and DKM centroid updates.

    Measured on SmolLM2-135M, 3 bits, 4 x 256 tokens per step, 2 threads (a plain step ~7.5 s): one LUT per tensor
    12.8 s per step with 3 updates per forward, ~10-12 s with none (``iters=0``); per 16 rows 43 s with 3 updates
    and ~14 s with none (in the unique domain a group of rows has nearly as many distinct values as weights, and
    the centroid updates are what the unique domain saves on). ``benchmarks/results/smollm2_*bit*.json`` ``phases``.

    >>> edkm_token_cost(PalettizeConfig(bits=3)), edkm_token_cost(PalettizeConfig(bits=3, group_size=16, iters=0))
    (1.7, 1.85)
    """
    if plan.group_size:
        return 1.85 if plan.iters == 0 else 5.7
    return 1.6 if plan.iters == 0 else 1.7


__all__ = ["SCORED_TOKEN", "baseline_shares", "edkm_token_cost", "job_costs"]
