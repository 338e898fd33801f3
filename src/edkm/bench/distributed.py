"""One configuration as a result row: its processes (N gloo ranks when sharded), the per-rank
results folded into one row, and rows computed for rank counts that were not measured.

:func:`measure_config` launches a configuration (``world`` fresh processes with torchrun's
environment variables; one in this process when ``isolate`` is off) and aggregates: a sharded row
reports the rank with the largest footprint, the slowest rank's seconds and the largest peak RSS,
with every rank under ``per_rank``. :func:`measure_sharded` runs a sharded configuration at each
rank count of ``--ranks`` and adds ``"measured": false`` rows from :func:`extrapolate` for the
counts of ``--extrapolate-ranks`` and those that did not fit the memory limit.
"""

from __future__ import annotations

from typing import Any

from edkm.bench.configs import BenchOptions, Log, Skipped, choose_units, estimate_peak_bytes
from edkm.bench.measure import child_env, launch, make_spec, measure_in_process, wait_for_memory
from edkm.bench.report import error_row, log_row


def _rank_env(rank: int, world: int, threads: int) -> dict[str, str]:
    """The environment of one rank: torchrun's variables, OpenMP threads = cores / ranks."""
    return child_env(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS=str(threads),
    )


def measure_config(config: str, opts: BenchOptions, ranks: int = 1, log: Log = print) -> dict:
    """Run one configuration (at ``ranks`` processes when sharded) and return its result row.

    Raises :class:`Skipped` when it cannot fit the memory limit, RuntimeError when a process fails.
    """
    mode, units = choose_units(config, opts, ranks)
    need = estimate_peak_bytes(config, opts, len(units[0]), ranks)
    spec = make_spec(config, opts, units, ranks)
    if ranks > 1 or opts.isolate:
        wait_for_memory(need, log)
        envs = [_rank_env(r, ranks, spec["threads"]) for r in range(ranks)] if ranks > 1 else [child_env()]
        per_rank = launch([dict(spec) for _ in range(ranks)], envs, opts.timeout)
    else:
        per_rank = [measure_in_process(spec)]
    row = _aggregate(config, ranks, per_rank)
    row.update(mode=mode, isolated=opts.isolate or ranks > 1, estimated_peak_bytes=need)
    return row


_SUMMED = (
    "footprint",
    "device_bytes",
    "host_bytes",
    "copied_bytes",
    "saved",
    "stored",
    "referenced",
    "seconds",
    "forward_seconds",
    "cpu_seconds",
    "init_seconds",
)


def _sum_units(res: dict) -> dict:
    """One process's units added up (bytes, counts and seconds; ``kinds`` per kind)."""
    tot: dict[str, Any] = {k: sum(u[k] for u in res["units"]) for k in _SUMMED}
    kinds: dict[str, int] = {}
    for u in res["units"]:
        for k, v in u["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    tot["kinds"] = kinds
    return tot


def _aggregate(config: str, ranks: int, per_rank: list[dict]) -> dict:
    """The result row of one configuration from the results of its processes."""
    sums = [_sum_units(r) for r in per_rank]
    s = max(sums, key=lambda x: x["footprint"])  # the first rank holding the most
    units = per_rank[0]["units"]
    row: dict[str, Any] = {
        "config": config,
        "ranks": ranks,
        "measured": True,
        "footprint_bytes": s["footprint"],
        "device_bytes": s["device_bytes"],
        "host_bytes": s["host_bytes"],
        "copied_bytes": s["copied_bytes"],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in per_rank),
        "seconds": max(x["seconds"] for x in sums),
        "forward_seconds": max(x["forward_seconds"] for x in sums),
        "cpu_seconds": max(x["cpu_seconds"] for x in sums),
        "kinds": s["kinds"],
        "saved_tensors": s["saved"],
        "stored_storages": s["stored"],
        "referenced": s["referenced"],
        "threads": per_rank[0]["threads"],
        "baseline_rss_bytes": max(r["baseline_rss_bytes"] or 0 for r in per_rank),
        "units": [u["projections"] for u in units],
        "unit_seconds": [u["seconds"] for u in units],
        "unit_peak_note": "peak_rss_bytes is the process's VmHWM over all units (the largest)",
        "kmeans_init_seconds": s["init_seconds"],
        "loadavg_1min": [u["loadavg_1min"] for u in units],
        "finite_gradients": all(u["finite"] for r in per_rank for u in r["units"]),
        "out_sum": [x for u in units for x in u["out_sum"]],
        "grad_sum": [x for u in units for x in u["grad_sum"]],
        "grad_abs_sum": [x for u in units for x in u["grad_abs_sum"]],
        "torch": per_rank[0]["torch"],
    }
    if ranks > 1:
        row["per_rank"] = [
            {
                "rank": r["rank"],
                "footprint_bytes": x["footprint"],
                "host_bytes": x["host_bytes"],
                "device_bytes": x["device_bytes"],
                "copied_bytes": x["copied_bytes"],
                "kinds": x["kinds"],
                "peak_rss_bytes": r["peak_rss_bytes"],
                "seconds": x["seconds"],
            }
            for r, x in zip(per_rank, sums)
        ]
        row["total_peak_rss_bytes"] = sum(r["peak_rss_bytes"] for r in per_rank)
        row["ranks_identical_gradients"] = all(
            [u["grad_sum"] for u in r["units"]] == [u["grad_sum"] for u in units] for r in per_rank
        )
    return row


def extrapolate(row: dict, to_ranks: int, opts: BenchOptions) -> dict:
    """Per-rank figures of a sharded config at ``to_ranks`` from a measured row (``measured: false``).

    Only the sharded part depends on the rank count: U's index list (kind "index") with U, each
    per-weight saved map (kind "shard") without U. Rank r keeps ceil(L / N) elements of a length-L
    tensor; everything else (distinct rows, centroids, ...) is the same on every rank.
    """
    n_from = row["ranks"]
    kind = "index" if "U" in row["config"] else "shard"
    part = row["kinds"].get(kind, 0)
    if kind == "index":  # one index of numel elements per projection
        per = -(-opts.numel // n_from)
        elem = part / (opts.projections * per)
        new_part = int(round(opts.projections * -(-opts.numel // to_ranks) * elem))
        how = (
            f"measured at {n_from} ranks minus its index shards ({part} B = {opts.projections} x ceil({opts.numel}/"
            f"{n_from}) x {elem:g} B) plus {opts.projections} x ceil({opts.numel}/{to_ranks}) x {elem:g} B"
        )
    else:  # many maps of lengths that are multiples of numel
        new_part = int(round(part * n_from / to_ranks))
        exact = opts.numel % (n_from * to_ranks) == 0
        how = f"measured at {n_from} ranks with its map shards ({part} B) scaled by {n_from}/{to_ranks}" + (
            " (exact: every sharded length is a multiple of both rank counts)" if exact else " (ignores padding)"
        )
    delta = new_part - part
    return {
        "config": row["config"],
        "ranks": to_ranks,
        "measured": False,
        "footprint_bytes": row["footprint_bytes"] + delta,
        "device_bytes": row["device_bytes"] + (delta if row["device_bytes"] >= part and row["host_bytes"] == 0 else 0),
        "host_bytes": row["host_bytes"] + (delta if row["host_bytes"] >= part else 0),
        "copied_bytes": row["copied_bytes"] + (delta if row["copied_bytes"] >= part else 0),
        "peak_rss_bytes": None,
        "seconds": None,
        "kinds": {**row["kinds"], kind: new_part},
        "computed_from": f"{row['config']}@{n_from}",
        "how": "computed, not measured: " + how,
        "mode": f"computed from {row['config']}@{n_from}",
    }


def measure_sharded(config: str, opts: BenchOptions, log: Log = print) -> list[dict]:
    """The rows of a sharded configuration: one per measured rank count, then the computed ones.

    Computed rows (from the measurement at the most ranks) cover ``--extrapolate-ranks`` and the rank
    counts that did not fit the memory limit; with two or more measured counts, the measured row the
    others are computed from gets a ``model_check`` of the computation against the fewest ranks.
    """
    rows: list[dict] = []
    measured: list[dict] = []
    skipped: dict[int, str] = {}
    for n in opts.ranks:
        log(f"{config} at {n} ranks...")
        try:
            row = measure_config(config, opts, n, log)
        except Skipped as err:
            skipped[n] = str(err)
            log(f"  {config}@{n}: {err}")
            continue
        except RuntimeError as err:
            row = error_row(config, n, str(err))
        rows.append(row)
        log_row(row, log)
        if row.get("measured"):
            measured.append(row)
    if not measured:
        return rows + [error_row(config, n, why) for n, why in skipped.items()]
    base = max(measured, key=lambda r: r["ranks"])
    for n in sorted({*skipped, *opts.extrapolate_ranks} - {r["ranks"] for r in measured}):
        row = extrapolate(base, n, opts)
        if n in skipped:
            row["skipped_measurement"] = skipped[n]
        rows.append(row)
    if len(measured) > 1:  # the computation checked against the other measured rank count
        lo = min(measured, key=lambda r: r["ranks"])
        pred = extrapolate(base, lo["ranks"], opts)["footprint_bytes"]
        base["model_check"] = {
            "predicted_footprint_at": lo["ranks"],
            "predicted": pred,
            "measured": lo["footprint_bytes"],
            "relative_error": (pred - lo["footprint_bytes"]) / lo["footprint_bytes"],
        }
    return rows
