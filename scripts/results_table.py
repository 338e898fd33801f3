"""The main job's and the memory benchmark's results tables, from the committed JSON results.

    python scripts/results_table.py            # print them (benchmarks/results/compress_*.json, memory.md)
    python scripts/results_table.py --readme   # rewrite them between their markers in README.md and docs/*.md
                                               # (--docs is the same flag)
    python scripts/results_table.py --collect runs/smollm2-135m smollm2_3bit
        # benchmarks/results/smollm2_3bit.json from a finished run folder (report.json + zeroshot.json)

The compress table is in README.md and docs/results.md, the memory and kernels tables in docs/results.md; every
`<!-- NAME table -->` ... `<!-- /NAME table -->` section found is rewritten, files are written only
when they change, so a second run changes nothing.
"""

import json
import re
import sys
from pathlib import Path

from doc_sections import rewrite_sections  # scripts/doc_sections.py: one writer for the three scripts

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def compress_table() -> str:
    rows = [
        "| bits (decoder / embedding) | fp32 original | fp32 fine-tuned (control) | RTN per channel "
        "| k-means per tensor (PTQ) | GPTQ per channel | SqueezeLLM-style per row "
        "| **eDKM** (hard, packed, reloaded) | eDKM vs control | packed size | split |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    peer = lambda r, k: f"{r[k + '_ppl']:.3f} ({r[k + '_bpw']:.2f} b/w)" if r.get(k + "_ppl") else "-"
    for path in sorted(RESULTS.glob("compress_*.json")):
        r = json.loads(path.read_text())
        embed = next(iter(r["plan"]["overrides"].values()), {}).get("bits", r["bits"])  # the --embed-bits override
        gap = r["edkm_ppl"] / r["fp_finetuned_ppl"] - 1
        rows.append(
            f"| {r['bits']} / {embed} | {r['fp_ppl']:.3f} | {r['fp_finetuned_ppl']:.3f} | {r['rtn_ppl']:.3f} | "
            f"{r['kmeans_ptq_ppl']:.3f} | {peer(r, 'gptq')} | {peer(r, 'squeeze')} | "
            f"**{r['edkm_ppl']:.3f}** | {gap:+.1%} | "
            f"{r['size_bytes'] / 1e3:.0f} kB (fp16 {r['fp_size_bytes'] / 1e3:.0f} kB) | "
            f"{r.get('eval_split', 'held-out 20 % (before the split)')} |"
        )
    return "\n".join(rows)


SMOLLM2_ROWS = (  # (key in report / zeroshot.json, label)
    ("original", "fp32 original (the Q4_1 GGUF, dequantized)"),
    ("rtn", "RTN per channel"),
    ("kmeans", "k-means per tensor"),
    ("kmeans_aw", "activation-aware k-means per tensor (eDKM's warm start)"),
    ("gptq", "GPTQ per channel"),
    ("gptq_g128", "GPTQ g128"),
    ("squeeze", "SqueezeLLM-style (Fisher-weighted k-means per row)"),
    ("edkm", "**eDKM** per tensor, fine-tuned (packed, reloaded)"),
)
GROUPED_ROWS = ("kmeans", "kmeans_aw", "edkm")  # the rows --group-size changes (RTN, GPTQ, per-row k-means: not)
PPL_KEYS = {"original": "fp_ppl", "rtn": "rtn_ppl", "kmeans": "kmeans_ptq_ppl", "edkm": "edkm_ppl"}
TASK_ORDER = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
# SmolLM2-135M-Instruct under lm-eval (third-party, full sets; PIQA / ARC / HellaSwag acc_norm), for the original's row
PUBLISHED = {"piqa": "66.9", "arc_easy": "54.1", "arc_challenge": "27.7", "hellaswag": "43.0", "winogrande": "-"}


def collect(run: Path, out: Path) -> None:
    """benchmarks/results/<name>.json from a finished run folder: its report and its zero-shot scores."""
    result = {"run": str(run), "report": json.loads((run / "report.json").read_text())}
    zeroshot = run / "zeroshot.json"
    result["zeroshot"] = json.loads(zeroshot.read_text()) if zeroshot.is_file() else None
    out.write_text(json.dumps(result, indent=1) + "\n")


def _bits(entry: dict | None) -> str:
    """Bits per weight of the decoder layers / of every clustered weight, read from the saved file."""
    if not entry or "bits_per_weight" not in entry:
        return "32 (fp32)"
    bpw = entry["bits_per_weight"]
    widths = [b for b in bpw if b.isdigit()]
    total = sum(bpw[b] * bpw["weights"][b] for b in widths) / sum(bpw["weights"][b] for b in widths)
    return f"{bpw[min(widths, key=int)]:.2f} / {total:.2f}"


def _task(scores: dict) -> str:
    metric = "acc_norm" if scores.get("acc_norm") is not None else "acc"
    value, stderr = scores[metric], scores.get(metric + "_stderr")
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr else "")


def is_main_run(path: Path) -> bool:
    """``smollm2_<b>bit.json`` / ``smollm2_<b>bit_g<rows>.json`` hold every row of a bit width (and LUT granularity);
    the other files (another recipe, another seed) add their eDKM row only, the post-training rows being the same."""
    return re.fullmatch(r"smollm2_\d+bit(_g\d+)?\.json", path.name) is not None


def recipe_label(report: dict) -> str:
    """eDKM's recipe as a row names it: its warm start, whether its LUTs move, its seed if not 0."""
    start = {"fisher": ", Fisher-weighted warm start", "activation": ", activation warm start"}
    iters = report["plan"].get("iters", 3)
    moves = ", LUT fixed (`--iters 0`)" if iters == 0 else f", {iters} centroid updates per forward"
    seed = report.get("train", {}).get("seed", 0)
    named = start.get(report.get("warm_start", "activation"), "")
    return f"{named}{moves}, fine-tuned" + (f", seed {seed}" if seed else "")


def smollm2_table() -> str:
    """SmolLM2-135M-Instruct: WikiText-2 perplexity and zero-shot accuracy of every method, per bit width."""
    paths = sorted(RESULTS.glob("smollm2_[0-9]*bit*.json"))  # smollm2_3bit.json, smollm2_3bit_g16.json, ...
    if not paths:
        return "(run `bash scripts/run.sh --model smollm2-135m`, then `python scripts/results_table.py --collect`)"
    head = "| bits | method | bits/weight (decoder / all) | WikiText-2 ppl | " + " | ".join(TASK_ORDER) + " | avg |"
    rows = [head, "| --- | --- | ---: | ---: | " + "---: | " * len(TASK_ORDER) + "---: |"]
    for path in paths:
        result = json.loads(path.read_text())
        r, zs = result["report"], (result.get("zeroshot") or {}).get("models", {})
        embed = next(iter(r["plan"]["overrides"].values()), {}).get("bits", r["bits"])
        rows_per_lut = r["plan"].get("group_size")  # --group-size: the LUT rows of k-means and eDKM
        recipe = not is_main_run(path)  # eDKM's row only
        for key, label in SMOLLM2_ROWS:
            if (rows_per_lut and key not in GROUPED_ROWS) or (recipe and key != "edkm"):  # as in the first run
                continue
            if rows_per_lut:
                label = label.replace("per tensor", f"per {rows_per_lut} rows")
            if key == "edkm":
                label = label.replace(", fine-tuned", recipe_label(r))
            ppl = r.get(PPL_KEYS.get(key, key + "_ppl"))
            if ppl is None or (key == "original" and path != paths[0]):  # the original once, atop the table
                continue
            entry = zs.get(key)
            tasks = [_task(entry["tasks"][t]) if entry and t in entry["tasks"] else "-" for t in TASK_ORDER]
            avg = f"{100 * entry['average']:.1f}" if entry else "-"
            bits = "-" if key == "original" else f"{r['bits']} / {embed}"
            rows.append(f"| {bits} | {label} | {_bits(entry)} | {ppl:,.2f} | " + " | ".join(tasks) + f" | {avg} |")
            if key == "original" and path == paths[0]:
                published = " | ".join(PUBLISHED[t] for t in TASK_ORDER)
                rows.append(f"| - | published, lm-eval (full sets, third-party) | - | - | {published} | - |")
    return "\n".join(rows)


def library_peers_table() -> str:
    """The peers through their own libraries on SmolLM2 (benchmarks/library_peers.py)."""
    paths = sorted(RESULTS.glob("smollm2_library_peers_*bit.json"))
    if not paths:
        return "(run `python benchmarks/library_peers.py`)"
    rows = [
        "| bits | method | library | bits/weight (decoder / all) | validation ppl | WikiText-2 ppl | zero-shot avg "
        "| built in |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path in paths:
        result = json.loads(path.read_text())
        for row in result["rows"].values():
            bits = _bits({"bits_per_weight": row["bits_per_weight"]})
            val = f"{row['val_ppl']:,.2f}" if "val_ppl" in row else "-"
            zs = f"{100 * row['zeroshot']['average']:.1f}" if "zeroshot" in row else "-"
            label = row["label"] + (f" (lr {row['lr']:g}, seed {row['seed']})" if "lr" in row else "")
            rows.append(
                f"| {result['bits']} / 8 | {label} | {row.get('library', 'coremltools 9.0')} | {bits} | {val} "
                f"| {row['ppl']:,.2f} | {zs} | {row['build_seconds']:.0f} s |"
            )
        for entry in result.get("unavailable", {}).values():  # a row its library cannot produce: the reason
            rows.append(f"| {result['bits']} / 8 | {entry['label']} | not run: {entry['reason']} | | | | | |")
    return "\n".join(rows)


def _library_label(name: str, row: dict) -> str:
    """A short plot label of a library peer row."""
    if name.startswith("coreml"):
        return ("coreml SKM" if "skm" in name else "coreml k-means") + (" g16" if name.endswith("g16") else "")
    return row["label"].split(" (")[0].replace("IntxWeightOnlyConfig ", "").replace(", fine-tuned", "")


SHORT = {
    "rtn": "RTN",
    "kmeans": "k-means",
    "kmeans_aw": "AW k-means",
    "gptq": "GPTQ",
    "gptq_g128": "GPTQ g128",
    "squeeze": "Fisher k-means/row",
    "edkm": "eDKM",
}


def _decoder_bits(bpw: dict) -> float:
    """Bits per weight of the decoder layers (the narrowest width) from a saved file's breakdown."""
    return bpw[min((b for b in bpw if b.isdigit()), key=int)]


def smollm2_points() -> list[dict]:
    """(label, bits, decoder bits/weight, ppl, zero-shot average or None, family) of every SmolLM2 result."""
    points = []
    for path in sorted(RESULTS.glob("smollm2_[0-9]*bit*.json")):
        result = json.loads(path.read_text())
        r, zs = result["report"], (result.get("zeroshot") or {}).get("models", {})
        group = r["plan"].get("group_size")
        recipe = not is_main_run(path)
        for key, _ in SMOLLM2_ROWS[1:]:
            entry, ppl = zs.get(key), r.get(PPL_KEYS.get(key, key + "_ppl"))
            if ppl is None or entry is None or "bits_per_weight" not in entry or (group and key not in GROUPED_ROWS):
                continue
            if recipe and key != "edkm":
                continue
            first = key == "edkm" and r["plan"].get("iters", 3) != 0  # the first recipe: LUTs learned, activation start
            seed = r.get("train", {}).get("seed", 0)
            label = SHORT[key] + (f" g{group}" if group else "") + (" (first recipe)" if first else "")
            label += f" s{seed}" if seed and key == "edkm" else ""
            points.append(
                dict(
                    label=label,
                    bits=r["bits"],
                    bpw=_decoder_bits(entry["bits_per_weight"]),
                    ppl=ppl,
                    zeroshot=100 * entry["average"],
                    family="edkm" if key == "edkm" else "peer",
                )
            )
    for path in sorted(RESULTS.glob("smollm2_library_peers_*bit.json")):
        result = json.loads(path.read_text())
        for name, row in result["rows"].items():
            points.append(
                dict(
                    label=_library_label(name, row),
                    bits=result["bits"],
                    bpw=_decoder_bits(row["bits_per_weight"]),
                    ppl=row["ppl"],
                    zeroshot=100 * row["zeroshot"]["average"] if "zeroshot" in row else None,
                    family="library",
                )
            )
    return points


def smollm2_plot(out: Path = RESULTS / "smollm2.png") -> Path | None:
    """WikiText-2 perplexity and zero-shot average against bits per weight, one point per method (PNG)."""
    import matplotlib  # deferred: only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = smollm2_points()
    if not points:
        return None
    original = json.loads(sorted(RESULTS.glob("smollm2_[0-9]*bit*.json"))[0].read_text())
    fp_ppl = original["report"]["fp_ppl"]
    fp_zs = ((original.get("zeroshot") or {}).get("models", {}).get("original") or {}).get("average")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    colors = {"edkm": "tab:red", "peer": "tab:blue", "library": "tab:green"}
    for p in points:
        marker = {3: "o", 4: "s"}.get(p["bits"], "^")
        for ax, y in ((left, p["ppl"]), (right, p["zeroshot"])):
            if y is None:
                continue
            ax.scatter(p["bpw"], y, marker=marker, color=colors[p["family"]], s=40 if p["family"] == "edkm" else 22)
            ax.annotate(p["label"], (p["bpw"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.axhline(fp_ppl, color="gray", ls=":", lw=1, label=f"fp32 original ({fp_ppl:.2f})")
    if fp_zs is not None:
        right.axhline(100 * fp_zs, color="gray", ls=":", lw=1, label=f"fp32 original ({100 * fp_zs:.1f})")
    left.set_yscale("log")
    left.set_ylabel("WikiText-2 perplexity (log scale)")
    right.set_ylabel("zero-shot average (%, 100 items per task)")
    for ax in (left, right):
        ax.set_xlabel("bits per weight of the decoder layers (from the saved file)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(
        "SmolLM2-135M-Instruct: eDKM (red), our peers (blue), peer libraries (green); circles 3-bit, squares 4-bit"
    )
    fig.savefig(out, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return out


def recipe_probe_table() -> str:
    """The short eDKM probes that chose the real-model recipe (benchmarks/recipe_probe.py), validation ppl."""
    path = RESULTS / "smollm2_recipe_probe.json"
    if not path.is_file():
        return "(run `python benchmarks/recipe_probe.py`)"
    rows = [
        "| warm start | LUT per | steps | lr | tau | DKM updates per forward | validation ppl: warm start (hard) "
        "| after the steps (hard) | KL first / last step | s per step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in json.loads(path.read_text())["probes"]:
        lut = f"{p['group_size']} rows" if p["group_size"] else "tensor"
        rows.append(
            f"| {p['warm_start']} | {lut} | {p['steps']} | "
            f"{p['lr']:g} | {p['tau']:g} | {p['iters']} | {p['val_ppl_warm_start']:,.1f} | "
            f"**{p['val_ppl_after']:,.1f}** | {p['losses'][0]:.2f} / {p['losses'][-1]:.2f} | "
            f"{p['train_seconds'] / p['steps']:.0f} |"
        )
    return "\n".join(rows)


def lmeval_table() -> str:
    """Our zero-shot scorer against lm-eval itself on SmolLM2 (benchmarks/lmeval_crosscheck.py)."""
    path = RESULTS / "lmeval_crosscheck_smollm2.json"
    if not path.is_file():
        return "(run `python benchmarks/lmeval_crosscheck.py`)"
    result = json.loads(path.read_text())
    rows = [
        f"| task | n | acc: ours / lm-eval {result['lm_eval_version']} | acc_norm: ours / lm-eval "
        "| largest log-likelihood difference | items whose choice differs |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for task, r in result["tasks"].items():
        ours, theirs = r["ours"], r["lm_eval"]
        rows.append(
            f"| {task} | {ours['n']} | {pct(ours['acc'])} / {pct(theirs['acc'])} | "
            f"{pct(ours['acc_norm'])} / {pct(theirs['acc_norm'])} | {r['max_abs_ll_diff']:.1e} | "
            f"{r['items_differing']} |"
        )
    return "\n".join(rows)


def memory_table() -> str:
    """The measured table and the target checks of memory.md (without its header and notes)."""
    path = RESULTS / "memory.md"
    if not path.is_file():
        return "(run `edkm bench memory`)"
    text = path.read_text()
    start = text.index("| config")
    return text[start : text.index("## Notes")].replace("## Targets", "Targets:").strip()


def kernels_table() -> str:
    """The native GEMV benchmark (benchmarks/results/kernels.md, written by `edkm bench kernels`)."""
    path = RESULTS / "kernels.md"
    return path.read_text().strip() if path.is_file() else "(run `edkm bench kernels`)"


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which == "--collect":  # --collect RUN_FOLDER NAME: benchmarks/results/NAME.json from a finished run
        collect(Path(sys.argv[2]), RESULTS / f"{sys.argv[3]}.json")
        sys.exit()
    if which in ("--readme", "--docs"):
        tables = {
            "compress": compress_table(),
            "smollm2": smollm2_table(),
            "library peers": library_peers_table(),
            "recipe probe": recipe_probe_table(),
            "lmeval": lmeval_table(),
            "memory": memory_table(),
            "kernels": kernels_table(),
        }
        for path in rewrite_sections(tables):
            print(f"rewrote {path.relative_to(ROOT)}", file=sys.stderr)
        plot = smollm2_plot()
        if plot is not None:
            print(f"drew {plot.relative_to(ROOT)}", file=sys.stderr)
        sys.exit()
    if which in ("all", "compress"):
        print(compress_table())
    if which in ("all", "smollm2"):
        print(smollm2_table())
    if which in ("all", "memory"):
        print(memory_table())
