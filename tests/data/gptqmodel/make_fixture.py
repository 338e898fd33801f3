"""Regenerate this folder's fixture with GPTQModel (run in its venv; ``tests/test_gptqmodel_format.py`` needs none).

    .venv-gptqmodel/bin/python tests/data/gptqmodel/make_fixture.py

A random 1-layer Llama is quantized by ``benchmarks/gptqmodel_quantize.py``'s ``quantize`` per config: for GPTQ
hidden 32, intermediate 96 (down_proj's 96 inputs leave a partial last group at g64, as SmolLM2's 576 do at g128),
for AWQ hidden 64, intermediate 128 (its clip search wants multiples of 64 outputs). Of each saved folder we keep
q_proj's (GPTQ: and down_proj's) tensors, input_layernorm (which AWQ rescales) and the quantize config, and beside
it ``<config>.dequantized.safetensors``: the library's own dense weights of those layers (GPTQ:
``dequantize_weight()`` of its loaded TorchLinear; AWQ: ``dequantize_gemm``), (out, in).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIGS = {
    "gptq3_g64": ("gptq", 3, 64),
    "gptq4_g32": ("gptq", 4, 32),
    "gptq4_pc": ("gptq", 4, -1),
    "awq4_g32": ("awq", 4, 32),
}
SIZES = {"gptq": (32, 96), "awq": (64, 128)}  # (hidden, intermediate)
LAYERS = {
    "gptq": ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"),
    "awq": ("model.layers.0.self_attn.q_proj",),
}
KEEP = ("qweight", "qzeros", "scales", "g_idx")


def random_llama(hidden: int, intermediate: int):
    """The random 1-layer fp model of a config (seed 0); ``tests/test_gptqmodel_format.py`` rebuilds it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128, **ids)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny(folder: Path, hidden: int, intermediate: int) -> None:
    """The random fp model and a word-level tokenizer (GPTQModel insists on one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    random_llama(hidden, intermediate).save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="t3"
    ).save_pretrained(folder)


def dense(model, sd: dict, prefix: str, method: str, group_size: int):
    """The library's own dequantized weight of one layer, (out, in) fp16."""
    if method == "awq":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        w = dequantize_gemm(sd[f"{prefix}.qweight"], sd[f"{prefix}.qzeros"], sd[f"{prefix}.scales"], 4, group_size)
        return w.t().contiguous()
    return model.model.get_submodule(prefix).dequantize_weight().t().contiguous()


def main() -> None:
    import torch

    sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import load_file, save_file

    from gptqmodel_quantize import quantize

    with tempfile.TemporaryDirectory() as tmp:
        for method, (hidden, intermediate) in SIZES.items():
            tiny(Path(tmp) / method, hidden, intermediate)
        g = torch.Generator().manual_seed(1)
        calib = [torch.randint(3, 64, (48,), generator=g).tolist() for _ in range(16)]
        for name, (method, bits, group_size) in CONFIGS.items():
            fp, out, layers = Path(tmp) / method, Path(tmp) / name, LAYERS[method]
            quantize(str(fp), calib, str(out), method, bits, group_size, "auto")
            sd = load_file(out / "model.safetensors")
            backend = BACKEND.TORCH if method == "gptq" else BACKEND.AUTO
            loaded = GPTQModel.load(str(out), device="cpu", dtype=torch.float16, backend=backend)
            ref = {f"{p}.weight": dense(loaded, sd, p, method, group_size).half() for p in layers}
            keep = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] in layers and k.rsplit(".", 1)[1] in KEEP}
            keep["model.layers.0.input_layernorm.weight"] = sd["model.layers.0.input_layernorm.weight"]
            target = HERE / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            save_file(keep, target / "model.safetensors", metadata={"format": "pt"})
            qcfg = json.loads((out / "quantize_config.json").read_text())
            (target / "quantize_config.json").write_text(json.dumps(qcfg, indent=1) + "\n")
            save_file(ref, HERE / f"{name}.dequantized.safetensors")


if __name__ == "__main__":
    main()
