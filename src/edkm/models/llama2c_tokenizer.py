"""llama2.c tokenizer: a direct port of ``run.c`` ``encode()`` / ``decode()`` over a ``tok512.bin`` export.

Example (the bundled ``tok512.bin``):

>>> from edkm.models import BUNDLED_MODEL_DIR
>>> tok = Llama2cTokenizer(BUNDLED_MODEL_DIR / "tok512.bin")
>>> tok.vocab_size
512
>>> ids = tok.encode("Once upon a time")
>>> ids[0] == BOS_ID, tok.decode(ids)
(True, 'Once upon a time')
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BOS_ID", "EOS_ID", "SPECIAL_TOKENS", "UNK_ID", "Llama2cTokenizer"]

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # canonical names of ids 0, 1, 2
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


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
