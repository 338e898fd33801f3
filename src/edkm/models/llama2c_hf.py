"""Conversion of a llama2.c checkpoint + tokenizer into a Hugging Face ``LlamaForCausalLM`` folder.

:func:`build_hf_tokenizer` turns ``tok512.bin`` into an equivalent ``PreTrainedTokenizerFast``;
:func:`permute_rotary` reorders q/k rows from llama2.c's interleaved RoPE pairs to HF's ``rotate_half`` halves;
:func:`llama2c_to_hf` writes the folder. ``transformers`` and ``tokenizers`` are imported inside the functions
that need them, so importing this module stays light.

Example (no ``transformers`` needed):

>>> w = torch.arange(8.0).view(8, 1)  # one head of size 8: rows are pairs (0,1) (2,3) (4,5) (6,7)
>>> permute_rotary(w, n_heads=1).flatten().tolist()
[0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edkm.models.llama2c_checkpoint import RMS_NORM_EPS, ROPE_THETA, read_llama2c_checkpoint
from edkm.models.llama2c_tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, Llama2cTokenizer

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

__all__ = ["build_hf_tokenizer", "llama2c_to_hf", "permute_rotary"]


def _hf_vocab(reference: Llama2cTokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Hugging Face BPE vocab and merges from a llama2.c tokenizer export.

    Ids 0..2 become ``<unk>``, ``<s>``, ``</s>``; 3..258 stay ``<0xHH>``; in the other pieces ``' '`` becomes ``'▁'``.
    Merges as in HF's SentencePiece converter: every split of a normal piece into two normal pieces, ranked by the
    merged piece's score (higher first), then by id and split.
    """
    vocab: dict[str, int] = {}
    for i, raw in enumerate(reference.pieces):
        if i < len(SPECIAL_TOKENS):
            token = SPECIAL_TOKENS[i]
        elif i < 3 + 256:
            token = raw.decode("ascii")
            if token != f"<0x{i - 3:02X}>":
                raise ValueError(f"expected byte piece <0x{i - 3:02X}> at id {i}, found {token!r}")
        else:
            token = raw.decode("utf-8").replace(" ", "▁")
        if token in vocab:
            raise ValueError(f"duplicate piece {token!r} (ids {vocab[token]} and {i})")
        vocab[token] = i
    normal = {token: i for token, i in vocab.items() if i >= 3 + 256}
    ranked = []
    for token, i in normal.items():
        for split in range(1, len(token)):
            left, right = token[:split], token[split:]
            if left in normal and right in normal:
                ranked.append((-reference.scores[i], i, split, left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    return vocab, merges


def build_hf_tokenizer(tok_path: str | Path, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build a ``PreTrainedTokenizerFast`` equivalent to :class:`Llama2cTokenizer` (``tok512.bin``).

    BPE with byte fallback; normalizer ``Prepend('▁')`` + ``Replace(' ', '▁')`` (SentencePiece dummy prefix, always
    added, exactly like run.c), no pre-tokenizer; decoder ``'▁'->' '``, byte fallback, fuse, strip one leading space;
    ``<s>`` prepended by the post-processor. Specials: ``<unk>``=0, ``<s>``=1, ``</s>``=2.
    """
    # deferred: tokenizers / transformers are heavy optional dependencies
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _hf_vocab(Llama2cTokenizer(tok_path))
    backend = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None)
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows per head from interleaved pairs to HF ``rotate_half`` halves.

    Same as HF ``convert_llama_weights_to_hf.permute``: within each head, rows ``(0,1),(2,3),...`` (pair ``i`` =
    rows ``2i, 2i+1``) become rows ``i`` and ``i + head_size/2``.
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_state_dict(cfg: dict[str, int], w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` state dict from llama2.c weights (q/k rows permuted by :func:`permute_rotary`)."""
    n_heads, n_kv = cfg["n_heads"], cfg["n_kv_heads"]
    state = {"model.embed_tokens.weight": w["token_embedding_table"], "model.norm.weight": w["rms_final_weight"]}
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = w["rms_att_weight"][i]
        state[p + "self_attn.q_proj.weight"] = permute_rotary(w["wq"][i], n_heads)
        state[p + "self_attn.k_proj.weight"] = permute_rotary(w["wk"][i], n_kv)
        state[p + "self_attn.v_proj.weight"] = w["wv"][i]
        state[p + "self_attn.o_proj.weight"] = w["wo"][i]
        state[p + "post_attention_layernorm.weight"] = w["rms_ffn_weight"][i]
        state[p + "mlp.gate_proj.weight"] = w["w1"][i]
        state[p + "mlp.down_proj.weight"] = w["w2"][i]
        state[p + "mlp.up_proj.weight"] = w["w3"][i]
    state["lm_head.weight"] = w["token_embedding_table"] if cfg["shared_classifier"] else w["wcls"]
    return state


def llama2c_to_hf(bin_path: str | Path, tok_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama2.c checkpoint + tokenizer into a Hugging Face ``LlamaForCausalLM`` folder.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32) and the tokenizer files
    (``tokenizer.json``, ``tokenizer_config.json``) into ``out_dir`` (created if needed) and returns it. The folder
    loads offline with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
    # deferred: transformers is a heavy optional dependency
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg, w = read_llama2c_checkpoint(bin_path)
    tokenizer = build_hf_tokenizer(tok_path, model_max_length=cfg["seq_len"])
    if len(tokenizer) != cfg["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {cfg['vocab_size']}")
    n_heads, n_kv = cfg["n_heads"], cfg["n_kv_heads"]
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["dim"],
        intermediate_size=cfg["hidden_dim"],
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=cfg["dim"] // n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg["seq_len"],
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=bool(cfg["shared_classifier"]),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        attention_bias=False,
        mlp_bias=False,
    )
    config.dtype = torch.float32
    state = _hf_state_dict(cfg, w)
    model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
