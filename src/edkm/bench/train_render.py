"""Table, JSON and README section of ``edkm bench train`` (rendered from the result alone).

>>> print(format_markdown({"rows": [{"config": "plain", "measured": True, "peak_above_start_bytes": 2**30,
...     "step_seconds": 2.0, "tokens_per_second": 256.0}], "targets": []}).splitlines()[2])
| plain | yes | 1.00 | - | - | 2.00 | - | 256.0 | - | - |
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edkm.atomic import write_text

HEADER = [
    "row",
    "measured",
    "peak above start GiB",
    "vs plain",
    "first-step peak GiB",
    "step s",
    "vs plain",
    "tokens/s",
    "forward / backward / AdamW s",
    "load",
]
MARK = ("<!-- train table -->", "<!-- /train table -->")


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _gib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**30:.2f}"


def format_markdown(result: dict[str, Any]) -> str:
    """The rows as a Markdown table, then the targets and each row's note or error."""
    lines = ["| " + " | ".join(HEADER) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * 8) + " |"]
    notes = []
    for r in result["rows"]:
        phases = r.get("phase_seconds")
        phase = " / ".join(f"{phases[k]:.2f}" for k in ("forward", "backward", "optimizer")) if phases else "-"
        measured = "yes" if r.get("measured") else "no (computed)" if r.get("peak_above_start_bytes") else "no"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["config"],
                    measured,
                    _gib(r.get("peak_above_start_bytes")),
                    _f(r.get("peak_vs_plain"), "{:.3f}x"),
                    _gib(r.get("first_step_peak_above_start_bytes")),
                    _f(r.get("step_seconds")),
                    _f(r.get("step_vs_plain"), "{:.2f}x"),
                    _f(r.get("tokens_per_second"), "{:.1f}"),
                    phase,
                    _f(r.get("loadavg_1min_end"), "{:.1f}"),
                ]
            )
            + " |"
        )
        for key in ("note", "error"):
            if r.get(key):
                notes.append(f"- {r['config']}: {r[key]}")
    if result.get("targets"):
        lines += ["", "| target | value | limit | met |", "| --- | ---: | ---: | --- |"]
        lines += [
            f"| {t['check']} | {t['value']:.3f} | {t['target']} | {'yes' if t['met'] else 'NO'} |"
            for t in result["targets"]
        ]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def replace_section(text: str, table: str) -> str:
    """``text`` with the part between the train-table markers replaced (ValueError when they are missing)."""
    pattern = re.compile(re.escape(MARK[0]) + ".*?" + re.escape(MARK[1]), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {MARK[0]} ... {MARK[1]} section to replace")
    return pattern.sub(lambda _m: f"{MARK[0]}\n{table}{MARK[1]}", text)


def write_result(result: dict[str, Any], out: Path, readme: Path | None = None) -> None:
    """JSON at ``out``, the table beside it (.md), and optionally the README section; all atomic."""
    write_text(out, json.dumps(result, indent=1, default=str) + "\n")
    table = format_markdown(result)
    write_text(out.with_suffix(".md"), table)
    if readme is not None:
        write_text(readme, replace_section(readme.read_text(), table))
