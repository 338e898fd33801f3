"""llama2.c checkpoints: reader, Hugging Face converter and plain-PyTorch reference.

The bundled model ``stories260K`` (Karpathy's tinyllamas, MIT) ships as a legacy (version-0) llama2.c export
``stories260K.bin`` plus the llama2.c tokenizer export ``tok512.bin``. This module

* reads both files (:func:`read_llama2c_checkpoint`, :class:`Llama2cTokenizer`),
* converts them into a standard Hugging Face ``LlamaForCausalLM`` checkpoint with a fast tokenizer
  (:func:`llama2c_to_hf`), and
* provides an independent, plain-PyTorch port of the llama2.c ``run.c`` forward pass
  (:func:`llama2c_forward`) and tokenizer, used by the tests as the reference for the converted checkpoint.

``transformers`` and ``tokenizers`` are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "HEADER_FIELDS",
    "read_llama2c_checkpoint",
    "llama2c_forward",
    "Llama2cTokenizer",
    "build_hf_tokenizer",
    "llama2c_to_hf",
    "permute_rotary",
    "rope_tables",
]

HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_HEADER_BYTES = 4 * len(HEADER_FIELDS)
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # canonical names of ids 0, 1, 2
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


def _tensor_shapes(cfg: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the float32 tensors of a version-0 llama2.c file, in file order."""
    d, h, n_l = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    head = d // cfg["n_heads"]
    kv = cfg["n_kv_heads"] * head
    shapes = [
        ("token_embedding_table", (cfg["vocab_size"], d)),
        ("rms_att_weight", (n_l, d)),
        ("wq", (n_l, d, d)),
        ("wk", (n_l, kv, d)),
        ("wv", (n_l, kv, d)),
        ("wo", (n_l, d, d)),
        ("rms_ffn_weight", (n_l, d)),
        ("w1", (n_l, h, d)),
        ("w2", (n_l, d, h)),
        ("w3", (n_l, h, d)),
        ("rms_final_weight", (d,)),
        ("freq_cis_real", (cfg["seq_len"], head // 2)),
        ("freq_cis_imag", (cfg["seq_len"], head // 2)),
    ]
    if not cfg["shared_classifier"]:
        shapes.append(("wcls", (cfg["vocab_size"], d)))
    return shapes


def read_llama2c_checkpoint(path: str | Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Read a legacy (version-0) llama2.c ``.bin`` checkpoint.

    The file is a little-endian header of 7 int32 (``HEADER_FIELDS``) followed by float32 tensors (see
    ``_tensor_shapes``). A positive ``vocab_size`` means the classifier is tied to the token embedding; a negative
    one means a separate ``wcls`` tensor follows.

    Returns ``(config, weights)``: ``config`` holds the header fields (``vocab_size`` made positive) plus
    ``shared_classifier`` (bool); ``weights`` maps llama2.c tensor names (``wq`` is ``[n_layers, dim, dim]``, in
    ``nn.Linear.weight`` layout, ...) to fp32 tensors.

    Raises ``FileNotFoundError`` if ``path`` is not a file and ``ValueError`` on a bad header or a file size that does
    not match it (truncated file, trailing bytes, or not a version-0 export).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    data = path.read_bytes()
    if len(data) < _HEADER_BYTES:
        raise ValueError(f"{path}: truncated llama2.c checkpoint ({len(data)} bytes, header needs {_HEADER_BYTES})")
    values = struct.unpack(f"<{len(HEADER_FIELDS)}i", data[:_HEADER_BYTES])
    cfg: dict[str, int] = dict(zip(HEADER_FIELDS, values))
    cfg["shared_classifier"] = cfg["vocab_size"] > 0
    cfg["vocab_size"] = abs(cfg["vocab_size"])
    if min(cfg[k] for k in HEADER_FIELDS) <= 0:
        raise ValueError(f"{path}: invalid llama2.c header {cfg} (is this a version-0 export?)")
    if cfg["dim"] % cfg["n_heads"] or cfg["n_heads"] % cfg["n_kv_heads"] or (cfg["dim"] // cfg["n_heads"]) % 2:
        raise ValueError(f"{path}: inconsistent llama2.c header {cfg}")
    shapes = _tensor_shapes(cfg)
    n_floats = sum(math.prod(shape) for _, shape in shapes)
    expected = _HEADER_BYTES + 4 * n_floats
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: size mismatch, file {what}: {len(data)} bytes, but header {cfg} implies {expected} bytes"
        )
    flat = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=_HEADER_BYTES).astype(np.float32))
    weights: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes:
        n = math.prod(shape)
        weights[name] = flat[offset : offset + n].reshape(shape).clone()
        offset += n
    return cfg, weights


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """run.c ``rmsnorm``: ``x / sqrt(mean(x^2) + 1e-5) * weight``."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS) * weight


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of the last dim; ``x`` is ``[B, T, heads, head_size]``."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def rope_tables(head_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[seq_len, head_size // 2]``; pair ``i`` rotates at ``10000^(-2i/head_size)``."""
    freqs = ROPE_THETA ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs[None, :]
    return angles.cos().float(), angles.sin().float()


@torch.no_grad()
def llama2c_forward(config: dict[str, int], weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Reference llama2.c forward pass: ``tokens`` ``LongTensor[B, T]`` (positions 0..T-1) -> logits ``[B, T, V]``.

    A direct transcription of ``run.c`` ``forward()`` batched over positions with a causal mask: pre-norm RMSNorm
    (eps 1e-5), RoPE on interleaved pairs, grouped-query attention (query head ``h`` uses K/V head
    ``h // (n_heads // n_kv_heads)``) scaled by ``1/sqrt(head_size)``, SwiGLU FFN ``w2(silu(w1 x) * w3 x)``, final
    RMSNorm and the (tied) classifier. Computed in the dtype of ``weights``; written independently of Hugging Face.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    b, t = tokens.shape
    if t > config["seq_len"]:
        raise ValueError(f"sequence length {t} exceeds the model's seq_len {config['seq_len']}")
    n_heads, n_kv = config["n_heads"], config["n_kv_heads"]
    head = config["dim"] // n_heads
    cos, sin = rope_tables(head, t)
    w = weights
    cos, sin = cos.to(w["wq"].dtype), sin.to(w["wq"].dtype)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = w["token_embedding_table"][tokens]
    for layer in range(config["n_layers"]):
        xb = _rms_norm(x, w["rms_att_weight"][layer])
        q = (xb @ w["wq"][layer].T).view(b, t, n_heads, head)
        k = (xb @ w["wk"][layer].T).view(b, t, n_kv, head)
        v = (xb @ w["wv"][layer].T).view(b, t, n_kv, head)
        q, k = _rope_interleaved(q, cos, sin), _rope_interleaved(k, cos, sin)
        q = q.transpose(1, 2) / math.sqrt(head)  # [B, H, T, hs]
        k = k.repeat_interleave(n_heads // n_kv, dim=2).transpose(1, 2)
        v = v.repeat_interleave(n_heads // n_kv, dim=2).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)).masked_fill_(~causal, float("-inf")).softmax(dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, t, n_heads * head)
        x = x + out @ w["wo"][layer].T
        xb = _rms_norm(x, w["rms_ffn_weight"][layer])
        x = x + (F.silu(xb @ w["w1"][layer].T) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    x = _rms_norm(x, w["rms_final_weight"])
    classifier = w["token_embedding_table"] if config["shared_classifier"] else w["wcls"]
    return x @ classifier.T


class Llama2cTokenizer:
    """Direct port of llama2.c ``run.c`` ``encode()`` / ``decode()`` over a ``tok512.bin``-style export.

    File layout: int32 ``max_token_length``, then per id: float32 score, int32 length, raw UTF-8 bytes. Pieces use a
    plain space where SentencePiece uses ``'▁'``; ids 3..258 are the byte pieces ``<0x00>``..``<0xFF>``.
    """

    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"llama2.c tokenizer not found: {path}")
        data = path.read_bytes()
        pieces: list[bytes] = []
        scores: list[float] = []
        try:
            (self.max_token_length,) = struct.unpack_from("<i", data, 0)
            offset = 4
            while offset < len(data):
                score, length = struct.unpack_from("<fi", data, offset)
                offset += 8
                if length < 0 or offset + length > len(data):
                    raise struct.error("piece runs past the end of the file")
                pieces.append(data[offset : offset + length])
                scores.append(score)
                offset += length
        except struct.error as exc:
            raise ValueError(f"{path}: truncated or malformed llama2.c tokenizer ({exc})") from exc
        self.pieces = pieces
        self.scores = scores
        self._lookup: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            self._lookup.setdefault(piece, i)  # run.c's bsearch would find any duplicate; there are none

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """run.c ``encode``: [BOS], dummy-prefix ``' '`` (non-empty text), code points (else byte fallback), merges.

        The merge loop is run.c's: repeatedly merge the adjacent pair whose concatenation is a piece with the highest
        score (the leftmost such pair on ties) until no pair merges. Pair scores are cached and only the pairs next
        to a merge are recomputed, which gives the same result as rescanning everything each round.
        """
        tokens: list[int] = [self.bos_id] if bos else []
        start = len(tokens)
        if text:
            tokens.append(self._lookup[b" "])
        for char in text:
            raw = char.encode("utf-8", errors="surrogatepass")
            piece_id = self._lookup.get(raw)
            tokens.extend([piece_id] if piece_id is not None else [byte + 3 for byte in raw])
        seq = tokens[start:]
        pair = [self._pair(seq[i], seq[i + 1]) for i in range(len(seq) - 1)]
        while pair:
            best = max(range(len(pair)), key=lambda i: pair[i][0])  # max() keeps the first (leftmost) maximum
            score, merged = pair[best]
            if merged < 0:
                break
            seq[best : best + 2] = [merged]
            del pair[best]
            if best > 0:
                pair[best - 1] = self._pair(seq[best - 1], seq[best])
            if best < len(pair):
                pair[best] = self._pair(seq[best], seq[best + 1])
        tokens[start:] = seq
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def _pair(self, left: int, right: int) -> tuple[float, int]:
        """Score and id of the piece ``pieces[left] + pieces[right]``; ``(-inf, -1)`` if it is not a piece."""
        merged = self._lookup.get(self.pieces[left] + self.pieces[right], -1)
        return (self.scores[merged], merged) if merged >= 0 else (-math.inf, -1)

    def decode_piece(self, prev_token: int, token: int) -> bytes:
        """run.c ``decode``: drop a leading space after BOS; ``<0xHH>`` becomes the raw byte."""
        piece = self.pieces[token]
        if prev_token == self.bos_id and piece.startswith(b" "):
            piece = piece[1:]
        match = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(match.group(1), 16)]) if match else piece

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Concatenate :meth:`decode_piece` outputs (as run.c's generate loop prints them) into a string.

        The sequence is taken to follow a BOS, as in run.c, so a leading space of the first piece is dropped.
        Special ids 0, 1, 2 produce no text when ``skip_special_tokens`` (else their raw ``tok512.bin`` pieces).
        """
        out = bytearray()
        prev = self.bos_id
        for token in ids:
            token = int(token)
            if not (skip_special_tokens and token in (UNK_ID, BOS_ID, EOS_ID)):
                out += self.decode_piece(prev, token)
            prev = token
        return out.decode("utf-8", errors="replace")


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


def llama2c_to_hf(bin_path: str | Path, tok_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama2.c checkpoint + tokenizer into a Hugging Face ``LlamaForCausalLM`` folder.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32) and the tokenizer files
    (``tokenizer.json``, ``tokenizer_config.json``) into ``out_dir`` (created if needed) and returns it. The folder
    loads offline with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
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
    model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
