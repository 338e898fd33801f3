"""A benchmark result as a person reads it and as a script checks it.

:func:`format_table` is the plain-text table ``edkm bench memory`` prints, :func:`format_markdown`
the Markdown file beside the JSON (the same table plus the targets and notes), and
:func:`write_outputs` writes both files. One table row per result row:

    >>> text = format_table({"results": [{"config": "fused", "ranks": 1, "measured": True,
    ...     "footprint_bytes": 0, "device_bytes": 0, "host_bytes": 0, "copied_bytes": 0,
    ...     "peak_rss_bytes": 300 << 20, "seconds": 0.25, "mode": "block"}]})
    >>> text.splitlines()[2].split()
    ['fused', '1', '0.0', '0.0', '0.0', '0.0', '300', '0.25', '-', '-', '-', 'block']
"""

from __future__ import annotations

import json
from pathlib import Path

from edkm.bench.configs import BenchOptions, MiB
from edkm.bench.report import row_key

HEADER = [
    "config",
    "ranks",
    "footprint MiB",
    "device MiB",
    "host MiB",
    "copied MiB",
    "peak RSS MiB",
    "seconds",
    "CPU s",
    "load",
    "vs plain",
    "mode",
]
_LEFT = (0, 1, 11)  # left-aligned columns


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / MiB:,.1f}" if v < 100 * MiB else f"{v / MiB:,.0f}"


def _fmt_ratio(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}x" if v >= 100 else f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def mean_load(row: dict) -> float | None:
    """Mean 1-minute load average sampled before and after each timed step of a row."""
    samples = row.get("loadavg_1min")
    if isinstance(samples, dict):  # coremltools: {"steady": [before, after], ...}
        samples = [samples.get("steady") or []]
    flat = [x for pair in samples or [] for x in (pair or []) if x is not None]
    return sum(flat) / len(flat) if flat else None


def table_rows(result: dict) -> list[list[str]]:
    """The cells of every result row, in :data:`HEADER` order."""
    ratios = result.get("ratios", {})
    rows = []
    for r in result["results"]:
        if not r.get("measured") and r.get("error"):
            rows.append([r["config"], str(r["ranks"]), "error", *["-"] * (len(HEADER) - 3)])
            continue
        ranks = f"{r['ranks']}" + ("" if r.get("measured", True) else " (computed)")
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.2f}"
        cpu = "-" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.1f}"
        load = mean_load(r)
        ratio = "1x" if r["config"] == "plain" else _fmt_ratio(ratios.get(row_key(r)))
        rows.append(
            [
                r["config"],
                ranks,
                _mib(r["footprint_bytes"]),
                _mib(r["device_bytes"]),
                _mib(r["host_bytes"]),
                _mib(r["copied_bytes"]),
                _mib(r.get("peak_rss_bytes")),
                secs,
                cpu,
                "-" if load is None else f"{load:.1f}",
                ratio,
                r.get("mode", "-") or "-",
            ]
        )
    return rows


def format_table(result: dict) -> str:
    """Plain-text table (what ``edkm bench memory`` prints)."""
    rows = [HEADER, *table_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.ljust(w) if i in _LEFT else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The Markdown report: the case, the table, the targets and the notes."""
    align = ["---:" if i not in _LEFT else "---" for i in range(len(HEADER))]
    lines = [
        "# DKM memory benchmark (`edkm bench memory`)",
        "",
        f"Produced by: `{result['command']}`",
        "",
        f"- case: {result['projections']} x {result['shape'][0]} x {result['shape'][1]} bf16 weights "
        f"({result['case']}), {result['bits']} bits, per-tensor LUT, iters={result['iters']}, "
        f"tau = {result['tau_relative']} x median squared centroid gap",
        f"- machine: {result['machine']}",
        f"- torch {result['torch']}; {result['date']}",
        "",
        "| " + " | ".join(HEADER) + " |",
        "| " + " | ".join(align) + " |",
        *["| " + " | ".join(r) + " |" for r in table_rows(result)],
        "",
        "MiB = 2^20 bytes. `vs plain` = footprint of plain DKM / footprint of the row. `seconds` = forward + backward "
        "wall time, `CPU s` = process CPU time of it (all threads), `load` = mean 1-minute load average of the "
        "machine while it ran (2 cores, shared). Sharded rows are per rank; `(computed)` rows are not measured.",
        "",
        "## Targets",
        "",
        "| check | value | target | met |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, t in result.get("targets", {}).items():
        v = t.get("value")
        val = "-" if v is None else f"{v:,.2f}" if v < 1000 else f"{v:,.0f}"
        target = "-" if t.get("target") is None else f"{t['target']:g}"
        met = {True: "yes", False: "NO", None: "not measured"}[t.get("met")]
        lines.append(f"| {name} | {val} | {target} | {met} |")
    lines += ["", "## Notes", "", *[f"- {n}" for n in result.get("notes", [])], ""]
    return "\n".join(lines)


def write_outputs(result: dict, opts: BenchOptions) -> tuple[Path | None, Path | None]:
    """Write the JSON to ``opts.out`` and the Markdown to ``opts.md`` (default: ``out`` as .md)."""
    if not opts.out:
        return None, None
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = Path(opts.md) if opts.md else out.with_suffix(".md")
    md.write_text(format_markdown(result))
    return out, md
