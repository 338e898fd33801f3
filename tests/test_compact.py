"""Compact LUT weights (indices kept bit-packed, as loaded for CPU inference) compute exactly what uint8 ones do.

Bit for bit (``torch.equal``): the unpacked indices, the decoded weight, the embedding rows, the batch-1 GEMV
and the tiled prefill of every bit width, the saved file; the lean model shares the packed bytes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import edkm
from edkm.generation import LeanLlama
from edkm.kernels import native
from edkm.layers.lut import LUTModule, LUTWeight

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.load()[1]}")


def lut_weight(bits: int, rows: int = 37, cols: int = 576, groups: int = 1) -> LUTWeight:
    gen = torch.Generator().manual_seed(bits)
    lut = (torch.randn(groups, 1 << bits, generator=gen) * 0.1).half()
    idx = torch.randint(0, 1 << bits, (groups, rows * cols // groups), generator=gen).to(torch.uint8)
    return LUTWeight(lut, idx, torch.Size([rows, cols]), bits, torch.float32)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("groups", [1, 37])
def test_compact_weight_computes_bit_for_bit_alike(bits, groups):
    plain = lut_weight(bits, groups=groups)
    compact = copy.deepcopy(plain)
    assert compact.compact_() and compact.compact and not plain.compact
    assert torch.equal(compact.indices, plain.indices) and torch.equal(compact(), plain())
    assert compact.packed.numel() <= plain.indices.numel()  # b/8 bytes per weight (+ row padding)
    with torch.no_grad():
        for tokens in (1, 3, 40):  # native GEMV; tiled prefill
            x = torch.randn(tokens, 576)
            assert torch.equal(compact.linear(x), plain.linear(x)), tokens
        ids = torch.tensor([[0, 36, 5]])
        assert torch.equal(compact.embedding(ids), plain.embedding(ids))
    compact.set_kernel("eager")  # another kernel unpacks the indices it needs
    plain.set_kernel("eager")
    assert torch.equal(compact.linear(torch.ones(2, 576)), plain.linear(torch.ones(2, 576)))


def test_assigning_indices_makes_a_compact_weight_plain():
    w = lut_weight(3)
    w.compact_()
    new = w.indices.clone()
    new[0, :5] = 7
    w.indices = new
    assert not w.compact and "packed" not in dict(w.named_buffers())
    assert torch.equal(w.indices, new) and torch.allclose(w.linear(torch.ones(1, 576)), w().sum(1)[None], atol=1e-5)


def test_compact_weight_keeps_gradients_for_inputs():
    plain, compact = lut_weight(3), lut_weight(3)
    compact.compact_()
    x1, x2 = torch.randn(5, 576, requires_grad=True), None
    x2 = x1.detach().clone().requires_grad_()
    plain.linear(x1).sum().backward()
    compact.linear(x2).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_loading_compacts_and_saving_again_gives_the_same_file(tmp_path):
    model = edkm.rtn_(
        torch.nn.Sequential(torch.nn.Embedding(50, 32), torch.nn.Linear(32, 24)), edkm.PalettizeConfig(bits=3)
    )
    first = tmp_path / "a.safetensors"
    edkm.save_palettized(model, first)
    loaded = edkm.load_palettized(first, torch.nn.Sequential(torch.nn.Embedding(50, 32), torch.nn.Linear(32, 24)))
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not any(m.lut.compact for m in loaded.modules() if isinstance(m, LUTModule))  # load_into: as given
    for m in loaded.modules():
        if isinstance(m, LUTModule):
            m.lut.compact_()
    second = tmp_path / "b.safetensors"
    edkm.save_palettized(loaded, second)
    assert first.read_bytes() == second.read_bytes()


def test_from_pretrained_models_are_compact_and_the_lean_model_shares_their_bytes(tmp_path, tiny_causal_lm):
    model = edkm.rtn_(tiny_causal_lm("llama").eval(), edkm.PalettizeConfig(bits=3))
    edkm.save_palettized(model, tmp_path / "m.safetensors")
    loaded = edkm.load_palettized(tmp_path / "m.safetensors")
    luts = [m.lut for m in loaded.modules() if isinstance(m, LUTModule)]
    assert luts and all(lut.compact for lut in luts)
    assert "indices" not in "".join(loaded.state_dict())  # no uint8 copy resident
    lean = LeanLlama(loaded, 16)
    fused = lean.layers[0].qkv.parts[0].packed.packed
    attn = loaded.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.lut.packed.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    ids = torch.tensor([[4, 8, 15, 16]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
def test_dense_streams_become_the_kernels_rows_from_any_byte_aligned_offset(bits):
    idx = torch.randint(0, 1 << bits, (9, 100), dtype=torch.uint8)
    stream = edkm.export.pack_bits(idx, bits)
    rows = native.pack_dense(stream, bits, 100, torch.empty(9, native.stride(bits, 100), dtype=torch.uint8))
    assert torch.equal(rows, native.pack(idx, bits))
    shifted = edkm.export.pack_bits(torch.cat([torch.zeros(3, dtype=torch.uint8), idx.reshape(-1)]), bits)
    out = torch.empty(9, native.stride(bits, 100), dtype=torch.uint8)
    start = 3 * bits // 8
    native.pack_dense(shifted[start:], bits, 100, out, bit_offset=3 * bits % 8)  # the stream starts mid-byte
    assert torch.equal(out, rows)


def streamed_model(tmp_path, tiny_causal_lm, **config):
    model = edkm.rtn_(tiny_causal_lm("llama").eval(), edkm.PalettizeConfig(bits=3, **config))
    path = tmp_path / "m.safetensors"
    edkm.save_palettized(model, path)
    return model, path


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_a_streamed_load_builds_rows_chunk_by_chunk_bit_for_bit(tmp_path, tiny_causal_lm, monkeypatch, chunk):
    from edkm.export import stream

    model, path = streamed_model(tmp_path, tiny_causal_lm, group_size=4)
    monkeypatch.setattr(stream, "CHUNK", chunk)  # 7 bytes: many chunks per tensor, rows split across them
    packed, tensors = stream.read_streamed(path)
    for name in packed.layers:
        lut = model.get_submodule(name).lut
        rows, cols = lut.shape[0], lut.shape[-1]
        assert torch.equal(tensors[f"{name}.packed"], native.pack(lut.indices.reshape(rows, cols), 3)), name
    loaded = edkm.load_palettized(path)
    ids = torch.tensor([[4, 8, 15, 16]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_streamed_load_refuses_a_changed_index_byte(tmp_path, tiny_causal_lm):
    from edkm.export import stream

    _, path = streamed_model(tmp_path, tiny_causal_lm)
    packed = edkm.export.inspect_file(path)
    name = next(iter(packed.layers))
    with open(path, "rb") as f:
        start, end = stream.byte_ranges(f, path)[f"{name}.indices"]
    data = bytearray(path.read_bytes())
    data[end - 1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(edkm.export.FormatError, match="checksum mismatch"):
        edkm.load_palettized(path)


def test_a_file_loaded_in_float64_decodes_the_streamed_rows_as_plain_indices(tmp_path, tiny_causal_lm):
    from edkm.export.layers import build_lut
    from edkm.export.stream import read_streamed

    model, path = streamed_model(tmp_path, tiny_causal_lm)
    packed, tensors = read_streamed(path)
    name, layer = next(iter(packed.layers.items()))
    parts = {p: tensors[f"{name}.{p}"] for p in ("lo", "step", "packed")}
    lut = build_lut(layer, parts, torch.float64)
    assert not lut.compact and torch.equal(lut.indices, model.get_submodule(name).lut.indices)
