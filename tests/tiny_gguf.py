"""Test helper: write a tiny random Llama, with a byte-level BPE tokenizer, as an F32 GGUF file.

The file is what llama.cpp's ``convert_hf_to_gguf.py`` would write for such a model, so that transformers' GGUF
loader turns it back into the *same* ``LlamaForCausalLM`` (logits equal to fp32 rounding):

* tensor names come from ``gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)`` -- the very table transformers
  inverts in ``modeling_gguf_pytorch_utils.get_gguf_hf_weights_map`` (``model.layers.0.self_attn.q_proj`` ->
  ``blk.0.attn_q``, ``model.embed_tokens`` -> ``token_embd``, ``lm_head`` -> ``output``, ``model.norm`` ->
  ``output_norm``), plus the ``.weight`` suffix;
* ``attn_q`` / ``attn_k`` rows are permuted as llama.cpp's ``LlamaModel.permute`` does (rotate-half -> interleaved
  rope layout); transformers' ``LlamaTensorProcessor._reverse_permute_weights`` undoes it on load. ``attn_k`` uses
  the KV head count;
* arrays keep the torch shape ``(out, in)``; ``GGUFWriter`` stores the dims reversed (ggml order) and the reader
  reverses them back;
* config keys are the ``llama.*`` ones transformers maps in ``integrations/ggml.py::GGUF_CONFIG_MAPPING``;
  no ``output.weight`` tensor means ``tie_word_embeddings=True`` on load (that is how transformers decides);
* the tokenizer is ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE: the 256 GPT-2 byte symbols, a few merges
  whose results are tokens too, and control tokens), which transformers' ``byte_level_tokenizer`` turns into a
  ``GPT2Tokenizer``. ``tokenizer.ggml.pre = "gpt2"`` keeps GPT-2's own pre-tokenizer.

"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


# GPT-2's byte -> printable-unicode table (same as transformers.convert_slow_tokenizer.bytes_to_unicode), inlined
# so the vocabulary does not depend on a private transformers helper.
def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: control tokens
# BPE merges in priority order ("Ġ" is the byte-level space). Each merge's parts are bytes or earlier results.
MERGES = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("Ġ", "o"),
    ("Ġ", "w"),
    ("Ġ", "c"),
    ("i", "s"),
    ("Ġ", "b"),
    ("a", "n"),
    ("o", "r"),
    ("e", "s"),
    ("Ġ", "f"),
    ("in", "g"),
    ("Ġ", "p"),
    ("e", "d"),
    ("Ġ", "m"),
    ("a", "l"),
    ("Ġa", "n"),
    ("Ġan", "d"),
    ("Ġ", "h"),
    ("o", "u"),
    ("l", "l"),
    ("Ġ", "i"),
    ("Ġi", "s"),
    ("Ġ", "P"),
    ("a", "r"),
    ("Ġp", "ar"),
    ("Ġ", "F"),
    ("r", "an"),
    ("Ġ", "C"),
    ("i", "t"),
    ("it", "al"),
]
TEXT = "The capital of France is Paris, and the cat is on the mat."  # what the round-trip test encodes


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """``(tokens, merges as "a b" strings, token types)``: 3 specials + 256 byte symbols + ``len(MERGES)``."""
    tokens = SPECIAL_TOKENS + list(bytes_to_unicode().values())
    known = set(tokens)
    for left, right in MERGES:
        assert left in known and right in known, (left, right)
        tokens.append(left + right)
        known.add(left + right)
    assert len(set(tokens)) == len(tokens)
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))  # 3 CONTROL, 1 NORMAL
    return tokens, [f"{a} {b}" for a, b in MERGES], types


def tiny_llama(tied: bool = False, seed: int = 0):
    """A random ``LlamaForCausalLM``: hidden 64, 2 layers, 4 heads / 2 KV heads, intermediate 128, ~300 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab_size = len(tiny_vocab()[0])
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the init leaves norms at 1; randomise them so a dropped/misnamed norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` for q/k projections (inverse of transformers' ``_reverse_permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: str | Path, name: str = "tiny-llama-test") -> Path:
    """Write ``model`` (a ``LlamaForCausalLM`` whose vocab is :func:`tiny_vocab`) to ``path`` as F32 GGUF."""
    import gguf

    cfg = model.config
    path = Path(path)
    tokens, merges, types = tiny_vocab()
    assert cfg.vocab_size == len(tokens)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)

    for hf_name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight, and transformers ties when it is absent
        base, suffix = hf_name.rsplit(".", 1)
        gguf_base = name_map.get_name(base)
        if gguf_base is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        data = tensor.detach().to(torch.float32).numpy().copy()
        if gguf_base.endswith(".attn_q"):
            data = llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif gguf_base.endswith(".attn_k"):
            data = llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        writer.add_tensor(f"{gguf_base}.{suffix}", np.ascontiguousarray(data))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_tiny_gguf(path: str | Path, tied: bool = False, seed: int = 0):
    """Build :func:`tiny_llama` and write it to ``path``; returns ``(path, model)``."""
    model = tiny_llama(tied=tied, seed=seed)
    return write_gguf(model, path), model
