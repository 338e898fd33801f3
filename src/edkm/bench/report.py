"""The derived parts of a benchmark result: ratios to plain DKM, the targets, and the notes.

:func:`summarize` (re)computes all three from the result rows alone, so a committed result can be
re-rendered without measuring again. A row is keyed ``config`` or, for sharded rows, ``config@ranks``:

    >>> row_key({"config": "M+U+S", "ranks": 8})
    'M+U+S@8'
    >>> round(offload_ratio(iters=3, k=8), 4)
    1.5231
"""

from __future__ import annotations

from typing import Any

from edkm.bench.configs import PAPER_RATIOS, BenchOptions, GiB, Log, MiB

# why save_on_cpu holds more than M (see offload_ratio)
OFFLOAD_WHY = (
    "Per soft assignment autograd saves the distances D (for the square's backward), the attentions A twice "
    "(softmax's output, and A in A * x resp. A * C), and in each centroid update the (n, 1) fp32 weight column x. "
    "save_on_cpu copies every one of them: 3 (iters + 1) maps + iters columns; M stores each storage once: "
    "2 (iters + 1) maps + one column (none when iters = 0; a map is k columns)."
)


def row_key(row: dict) -> str:
    return row["config"] if row["ranks"] == 1 else f"{row['config']}@{row['ranks']}"


def error_row(config: str, ranks: int, why: str) -> dict[str, Any]:
    """The row of a configuration that was not measured, and why."""
    return {"config": config, "ranks": ranks, "measured": False, "error": why}


def log_row(row: dict, log: Log) -> None:
    """One progress line for a measured or failed row."""
    if row.get("measured"):
        log(
            f"  {row_key(row)}: footprint {row['footprint_bytes'] / MiB:,.1f} MiB, peak RSS "
            f"{row['peak_rss_bytes'] / MiB:,.0f} MiB, {row['seconds']:.2f} s"
        )
    elif row.get("error"):
        log(f"  {row_key(row)}: ERROR {row['error'][:500]}")


def compute_ratios(rows: list[dict]) -> dict[str, float]:
    """Footprint of plain DKM / footprint of each row (key ``config`` or ``config@ranks``)."""
    plain = next((r for r in rows if r["config"] == "plain" and r.get("footprint_bytes")), None)
    if plain is None:
        return {}
    return {
        row_key(r): plain["footprint_bytes"] / r["footprint_bytes"]
        for r in rows
        if r.get("footprint_bytes") and r["config"] != "plain"
    }


def offload_ratio(iters: int, k: int) -> float:
    """Expected save_on_cpu / M footprint of plain DKM with ``k`` centroids and ``iters`` updates.

    :data:`OFFLOAD_WHY` says why: 3 (iters + 1) maps + iters columns against 2 (iters + 1) maps + one
    column (none when iters = 0), a map being k columns.
    """
    return (3 * (iters + 1) * k + iters) / (2 * (iters + 1) * k + min(iters, 1))


def check_targets(rows: list[dict], ratios: dict[str, float], opts: BenchOptions | None = None) -> dict[str, dict]:
    """The brief's targets, each with the measured value and whether it is met (None: not measured)."""
    by = {row_key(r): r for r in rows}

    def ratio_target(key: str, target: float) -> dict:
        v = ratios.get(key)
        return {"value": v, "target": target, "met": None if v is None else v >= target}

    out = {
        "M+U footprint >= 16.4x smaller than plain": ratio_target("M+U", 16.4),
        "M+U+S at 8 ranks >= 130x smaller than plain": ratio_target("M+U+S@8", 130.0),
        "fused footprint >= 1000x smaller than plain": ratio_target("fused", 1000.0),
    }
    plain, fused, m, soc = by.get("plain"), by.get("fused"), by.get("M"), by.get("save_on_cpu")
    out["fused faster than plain (forward+backward)"] = {
        "value": None if not (plain and fused) else plain["seconds"] / fused["seconds"],
        "target": 1.0,
        "met": None if not (plain and fused) else fused["seconds"] < plain["seconds"],
        "unit": "plain seconds / fused seconds",
    }
    if m and plain:
        out["M stores every distinct storage once (M footprint == plain's distinct saved storages)"] = {
            "value": m["footprint_bytes"] / plain["footprint_bytes"],
            "target": 1.0,
            "met": m["footprint_bytes"] <= plain["footprint_bytes"] and m["referenced"] > 0,
            "unit": "M footprint / plain footprint",
        }
    if m and soc:
        offload = out["M vs save_on_cpu (copies every saved tensor)"] = {
            "value": soc["footprint_bytes"] / m["footprint_bytes"],
            "target": None,
            "met": soc["footprint_bytes"] > m["footprint_bytes"],
            "unit": "save_on_cpu footprint / M footprint"
            + (f"; copied bytes {soc['copied_bytes'] / m['copied_bytes']:.2f}x" if m["copied_bytes"] else ""),
        }
        if opts is not None:
            offload.update(expected=offload_ratio(opts.iters, opts.k), why=OFFLOAD_WHY)
    for key, paper in PAPER_RATIOS.items():
        out[f"paper: {key} {paper}x"] = ratio_target(key, paper)
    return out


# ------------------------------------------------------------------------------------------------
# Notes
# ------------------------------------------------------------------------------------------------


def _method_notes(opts: BenchOptions) -> list[str]:
    """How every row was measured (the same for every run)."""
    return [
        "Each configuration ran in a fresh Python process (one per rank); peak RSS is that process's VmHWM "
        "(for sharded rows the largest rank; all ranks share this machine, `total_peak_rss_bytes` in the JSON).",
        "CPU-only run: the host is the device. M/save_on_cpu count what a GPU run would hold on the host and copy "
        "device->host (`copied`), but nothing is physically copied (as torch's save_on_cpu does on CPU), so peak RSS "
        "and seconds contain no transfer.",
        "Footprint = bytes autograd holds for backward, each storage counted once; the weights (leaf tensors the model "
        "holds anyway) are not counted. plain counts what autograd saves; save_on_cpu counts every saved tensor as a "
        "separate copy, as torch.autograd.graph.save_on_cpu makes.",
        "Weights are synthetic: seeded Gaussian, std "
        f"{opts.std}, rounded to bf16 (no LLaMA checkpoint here); identical across configurations "
        "(out_sum/grad_sum in the JSON: M/U/S rows equal plain bit for bit, fused to float tolerance).",
        "seconds = forward + backward wall time of the DKM (k-means init excluded, one tiny warm-up step first). The "
        "machine is shared with other jobs (loadavg_1min in the JSON), so seconds are noisy; cpu_seconds is also "
        "recorded. Sharded ranks share the 2 cores (threads per rank = cores / ranks).",
    ]


def _mode_notes(opts: BenchOptions, rows: list[dict], by: dict[str, dict]) -> list[str]:
    """Which rows ran one projection at a time, which were computed, which could not run."""
    out = []
    per = [row_key(r) for r in rows if r.get("measured") and r.get("mode") == "per_projection"]
    block = [
        row_key(r) for r in rows if r.get("measured") and r.get("mode") == "block" and r["config"] != "coremltools"
    ]
    if per:
        out.append(
            f"The whole block does not fit the {opts.memory_limit_gib:g} GiB limit for {', '.join(per)}: "
            "those measured "
            f"the {opts.projections} projections one at a time in their process and added them (footprints, copies and "
            "seconds sum; peak RSS is the largest). "
            + (f"{', '.join(block)} ran the whole block as one forward + backward." if block else "")
        )
    if any(not r.get("measured", True) and not r.get("error") for r in rows):
        out.append(
            'Rows marked (computed) / "measured": false are derived from the measured per-rank shards: only the '
            "sharded part (U's index with U, the saved maps without U) scales as 1/N, the rest is per rank."
        )
    for r in rows:
        if r.get("skipped_measurement"):
            base = by.get(r["computed_from"], {})
            seen = ""
            if base.get("peak_rss_bytes"):
                seen = (
                    f" (measured: {r['computed_from']} peaked at {base['peak_rss_bytes'] / GiB:.1f} GiB per rank, "
                    f"{base.get('total_peak_rss_bytes', 0) / GiB:.1f} GiB for its {base['ranks']} ranks)"
                )
            out.append(
                f"{row_key(r)}: {r['skipped_measurement']}{seen}; its row is computed from {r['computed_from']}."
            )
    return out


def _finding_notes(opts: BenchOptions, rows: list[dict], by: dict[str, dict]) -> list[str]:
    """What the numbers show: M vs save_on_cpu, what M+U holds, the coremltools reference."""
    out = []
    m, soc, mu = by.get("M"), by.get("save_on_cpu"), by.get("M+U")
    if m and soc and by.get("plain") and m.get("footprint_bytes") and soc.get("footprint_bytes"):
        out.append(
            f"M vs save_on_cpu: {soc['footprint_bytes'] / m['footprint_bytes']:.3f}x (expected "
            f"{offload_ratio(opts.iters, opts.k):.3f}x). {OFFLOAD_WHY}"
            f" M equals plain's distinct saved storages ({m['footprint_bytes'] / by['plain']['footprint_bytes']:.4f}x"
            f" of plain; {m.get('referenced')} saves answered by reference): M moves the footprint off the device, it "
            "does not shrink it."
        )
    if mu and mu.get("kinds"):
        rows_b, index_b = mu["kinds"].get("rows", 0), mu["kinds"].get("index", 0)
        per_row = (2 * (opts.iters + 1) * opts.k + 1) * 4
        out.append(
            f"M+U holds {index_b / MiB:,.1f} MiB of index ({index_b / (opts.numel * opts.projections):g} B per weight) "
            f"and {rows_b / MiB:,.1f} MiB of distinct rows (~{rows_b / per_row / opts.projections:,.0f} distinct bf16 "
            "values per projection): the index dominates, which is what S shards."
        )
    coreml = next((r for r in rows if r["config"] == "coremltools"), None)
    if coreml and coreml.get("measured"):
        lay = coreml["layer"]
        out.append(
            f"coremltools {coreml.get('coremltools_version')} DKMPalettizer: one {opts.shape[0]}x{opts.shape[1]} layer "
            f"measured (benchmarks/coreml_reference.py measure_coreml, batch {lay.get('batch')}, "
            f"{lay.get('dkm_iterations')} DKM iterations, steady-state step), "
            f"footprint and seconds x{opts.projections} "
            f"for the block, peak RSS of the one layer; first step with k-means init "
            f"{lay.get('first_step_seconds'):.0f} s per layer. Footprint excludes its weight and input "
            f"(saved_bytes_new), as ours. It runs DKM in the weight dtype (bf16 maps), "
            f"ours in fp32 (docs/method.md §2). "
            f"docs/method.md §6 lists ~10.9 GB peak RSS and ~390 s first step for this layer "
            f"from an earlier measurement; this "
            f"run measured {coreml['peak_rss_bytes'] / GiB:.1f} GiB and {lay.get('first_step_seconds'):.0f} s."
        )
    elif coreml:
        out.append(f"coremltools not measured: {coreml.get('error')}")
    return out


def notes(opts: BenchOptions, rows: list[dict]) -> list[str]:
    """The notes of a result: how it was measured, then what its rows show."""
    by = {row_key(r): r for r in rows}
    return [*_method_notes(opts), *_mode_notes(opts, rows, by), *_finding_notes(opts, rows, by)]


def summarize(result: dict, opts: BenchOptions) -> dict:
    """(Re)compute the derived parts of a result from its rows: ratios, targets and notes."""
    rows = result["results"]
    result["ratios"] = compute_ratios(rows)
    result["targets"] = check_targets(rows, result["ratios"], opts)
    result["notes"] = notes(opts, rows)
    result["note"] = " ".join(result["notes"])
    return result
