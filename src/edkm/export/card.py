"""The model card (``README.md``) of a compressed model folder, from the ``edkm compress`` report.

Example:
    >>> from edkm.export.card import model_card
    >>> card = model_card({"model": "bundled:stories260K", "bits": 3, "edkm_ppl": 5.4, "size_bytes": 138_000,
    ...                    "fp_ppl": 5.5, "fp_size_bytes": 520_000, "steps": 300})
    >>> "| eDKM 3-bit, fine-tuned 300 steps | 5.400 | 138 kB |" in card
    True
"""

from __future__ import annotations

from typing import Any


def _row(name: str, ppl: float | None, size: int | None) -> str:
    return f"| {name} | {f'{ppl:.3f}' if ppl else '-'} | {f'{size / 1e3:,.0f} kB' if size else '-'} |"


def model_card(report: dict[str, Any]) -> str:
    """Markdown model card: what the model is, the report's perplexity/size table, and how to use it."""
    b, steps = report["bits"], report.get("steps")
    rows = [
        _row("fp32 original (fp16 size)", report.get("fp_ppl"), report.get("fp_size_bytes")),
        _row(f"fp32 fine-tuned {steps} steps (control)", report.get("fp_finetuned_ppl"), report.get("fp_size_bytes")),
        _row(f"RTN {b}-bit per channel", report.get("rtn_ppl"), report.get("rtn_size_bytes")),
        _row(f"k-means {b}-bit (post-training)", report.get("kmeans_ptq_ppl"), report.get("kmeans_ptq_size_bytes")),
        _row(f"eDKM {b}-bit, fine-tuned {steps} steps", report.get("edkm_ppl"), report.get("size_bytes")),
    ]
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [edkm, palettization, weight-clustering, lut]",
            "---",
            "",
            f"# {report.get('model', 'model')}, palettized to {b} bits with edkm",
            "",
            f"Every clustered weight is a LUT of 2^b fp16 values plus densely packed b-bit indices "
            f"(`quantization_config` in `config.json` lists the bits of every module), fine-tuned with eDKM "
            f"(train-time differentiable k-means). Held-out perplexity, context {report.get('context', '-')}, "
            f"{report.get('heldout_tokens', '-')} tokens:",
            "",
            "| model | held-out ppl | size |",
            "| --- | ---: | ---: |",
            *rows,
            "",
            "## Use",
            "",
            "```python",
            'import edkm  # registers the "edkm" quantization method with transformers',
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
            "```",
            "",
            "```bash",
            "edkm eval THIS_FOLDER --text held_out.txt",
            'edkm generate THIS_FOLDER --prompt "Once upon a time"',
            "edkm export coreml THIS_FOLDER --out model.mlpackage",
            "```",
            "",
        ]
    )
