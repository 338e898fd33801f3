"""Table and plot of ``edkm compare`` results (``compare_<b>bit.json``).

Example::

    python scripts/compare_table.py            # print the Markdown table
    python scripts/compare_table.py --readme   # rewrite the README section and the PNG
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edkm.atomic import atomic_path
from edkm.jobs.compare_methods import format_knob

PLOT = "compare.png"


def load_results(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("compare_*bit.json"))]


def _ppl(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def compare_table(results: Path) -> str:
    """One Markdown table over every bit width: method, bits per weight, validation and test perplexity."""
    lines = [
        "| bits | method | bits/weight (file) | seeds | knob (chosen on validation) | val ppl | **test ppl** |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    notes = []
    for report in load_results(results):
        b = report["bits"]
        rows = sorted(report["rows"], key=lambda r: (r["method"] != "fp", r["test_ppl"]))
        for r in rows:
            if r["method"] == "fp":
                lines.append(f"| {b} | fp32 original | 32 | - | - | {r['val_ppl']:.3f} | {r['test_ppl']:.3f} |")
                if r.get("control_test_ppl") is not None:
                    lines.append(
                        f"| {b} | fp32 fine-tuned control (teacher) | 32 | {len(r['seeds'])} | "
                        f"lr {report['config']['control_lr']:g} | "
                        f"{r['control_val_ppl']:.3f} | {_ppl(r['control_test_ppl'], r['control_test_ppl_std'])} |"
                    )
                continue
            name = f"**{r['label']}**" if r["method"].startswith("edkm") else r["label"]
            knob = f"{r['knob']} {format_knob(r['chosen'])}" if r.get("knob") else "-"
            knob += f" (as {r['tuned_like']})" if r.get("tuned_like") else ""
            seeds = str(len(r["seeds"])) if r.get("seeds") else "-"
            lines.append(
                f"| {b} | {name} | {r['bpw']:.2f} | {seeds} | {knob} | {r['val_ppl']:.3f} | "
                f"{_ppl(r['test_ppl'], r['test_ppl_std'])} |"
            )
        t = report.get("targets", {})
        if t.get("checked"):
            verdict = "met" if t["met"] else f"**missed**: {', '.join(t['lost_to'])} at or below eDKM"
            notes.append(
                f"- {b} bits: eDKM per tensor {t['edkm_test_ppl']:.3f} vs the peers at <= {t['limit_bpw']} bits/weight "
                f"({', '.join(t['peers_within_limit']) or 'none'}): {verdict}."
            )
        c = report["config"]
        notes.append(
            f"- {b} bits ran: seeds {c['seeds']}, {c['steps']} steps x batch {c['batch_size']}; not run: "
            f"{', '.join(report.get('not_run', [])) or 'nothing'}"
            + (f"; missing from the full protocol: {report['partial']['missing']}." if report.get("partial") else ".")
        )
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def write_plot(results: Path) -> Path:
    """Test perplexity against bits per weight, every method and bit width (PNG next to the JSON)."""
    # deferred: matplotlib is the peers extra, loaded only to draw the plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {3: "o", 4: "s"}
    fp = None
    for report in load_results(results):
        b = report["bits"]
        for r in report["rows"]:
            if r["method"] == "fp":
                fp = r
                continue
            ours = r["method"].startswith("edkm")
            ax.errorbar(
                r["bpw"],
                r["test_ppl"],
                yerr=r["test_ppl_std"] or 0,
                fmt=markers.get(b, "^"),
                color="tab:red" if ours else "tab:blue",
                ms=7 if ours else 5,
                capsize=2,
            )
            ax.annotate(
                f"{r['method']} {b}b", (r["bpw"], r["test_ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    if fp is not None and fp.get("control_test_ppl") is not None:
        ax.axhline(fp["control_test_ppl"], color="gray", ls="--", lw=1, label="fp32 fine-tuned control")
    if fp is not None:
        ax.axhline(fp["test_ppl"], color="gray", ls=":", lw=1, label="fp32 original")
    for i, report in enumerate(load_results(results)):
        limit = report.get("targets", {}).get("limit_bpw")
        if limit:
            ax.axvline(
                limit,
                color="tab:red",
                ls="-.",
                lw=0.8,
                alpha=0.5,
                label="target limits (bits + 0.25)" if i == 0 else None,
            )
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the quantized layers (from the saved file)")
    ax.set_ylabel("test perplexity (log scale)")
    ax.set_title("stories260K: eDKM (red) vs peers (blue); circles 3-bit, squares 4-bit")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    path = results / PLOT
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
