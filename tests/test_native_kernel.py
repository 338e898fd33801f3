"""Exactness tests of the edkm_lut CPU kernels against decode-then-matmul.

Metric (GEMV and prefill): per element, ``|y - ref| <= 1e-5 * (|x| @ |W|^T) + 1e-30`` where ``ref`` is
``x @ W^T`` in float64 from the decoded weight ``W`` (fp32 sums of exact weights differ from it only by
rounding, far below this bound). Embedding rows, pack/unpack round trips: bit-exact (``torch.equal``).
Every ISA path this CPU can run is tested (``isa=`` forces one); without a C++ compiler the tests skip and
edkm keeps its exact pure-PyTorch kernels.
"""

from __future__ import annotations

import pytest
import torch

from edkm.kernels import native as lut_cpu

MOD, REASON = lut_cpu.load()
NO_COMPILER = MOD is None and REASON.startswith("no C++ compiler")
needs_kernel = pytest.mark.skipif(MOD is None, reason=f"native kernel unavailable: {REASON}")

ALL_ISAS = ("scalar", "avx2", "avx512", "avx512vbmi")
SUPPORTED = tuple(MOD.supported_isas()) if MOD is not None else ()
TOKENS = (1, 2, 3, 4, 5, 7, 8)
PREFILL = 100
REL = 1e-5

# (rows, cols): odd shapes, and ones whose columns are multiples of 16/32 so grouped SIMD paths run too
SHAPES = ((7, 13), (33, 100), (129, 77), (48, 192), (20, 576), (3, 1100))


pytestmark = pytest.mark.skipif(NO_COMPILER, reason=f"native kernel unavailable: {REASON}")


def test_the_kernel_builds_where_there_is_a_compiler():
    assert MOD is not None, REASON  # a failed build with a compiler present is a bug, not a skip


def isa_param(isa: str):
    return pytest.param(isa, marks=pytest.mark.skipif(isa not in SUPPORTED, reason=f"CPU lacks {isa}"))


ISA_PARAMS = [isa_param(i) for i in ALL_ISAS]


def layouts(rows: int, cols: int) -> list[tuple[int, int]]:
    """(R, C) pairs: rows layout with R = rows, 1 and another divisor; cols layout with several C."""
    out = [(rows, cols), (1, cols)]
    out += [(r, cols) for r in range(2, rows) if rows % r == 0][:1]
    cs = [c for c in range(1, cols) if cols % c == 0]
    out += [(1, c) for c in cs if c % 16 == 0][:2] + [(1, c) for c in cs if c % 16][-2:]
    return list(dict.fromkeys(out))


def make(rows, cols, R, C, bits, seed, table_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    k = 1 << bits
    idx = torch.randint(0, k, (rows, cols), generator=g, dtype=torch.uint8)
    table = torch.randn(rows // R, cols // C, k, generator=g).to(table_dtype).float()
    return idx, table.contiguous()


def dense(idx, table, R, C):
    rows, cols = idx.shape
    r = torch.arange(rows)[:, None] // R
    c = torch.arange(cols)[None, :] // C
    return table[r, c, idx.long()]


def check_close(y, x, w):
    ref = x.double() @ w.double().T
    bound = REL * (x.double().abs() @ w.double().abs().T) + 1e-30
    err = (y.double() - ref).abs()
    assert torch.all(err <= bound), f"max err {err.max():.3g}, max err/bound {(err / bound).max():.3g}"


CASES = [(rows, cols, R, C) for rows, cols in SHAPES for R, C in layouts(rows, cols)]


@needs_kernel
@pytest.mark.parametrize(
    "bits,cols,stride",
    [(3, 576, 224), (4, 576, 288), (3, 1536, 576), (2, 576, 144), (1, 13, 16), (3, 64, 32), (8, 576, 576)]
    + [(5, 100, 128)],
)
def test_rows_take_their_bits_plus_at_most_one_short_block(bits, cols, stride):
    """A narrow row's last block keeps only the word width its bits need (8, 16 or 32 bits per lane)."""
    assert MOD.packed_stride(bits, cols) == stride


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("rows,cols,R,C", CASES)
def test_gemv_and_prefill(rows, cols, R, C, bits, isa, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        idx, table = make(rows, cols, R, C, bits, seed=rows * 1000 + cols + bits)
        w = dense(idx, table, R, C)
        packed = MOD.pack_rows(idx, bits)
        assert packed.shape == (rows, MOD.packed_stride(bits, cols)) and packed.shape[1] % 16 == 0
        assert torch.equal(MOD.unpack_rows(packed, bits, cols), idx)
        g = torch.Generator().manual_seed(bits)
        for T in TOKENS + (PREFILL,):
            x = torch.randn(T, cols, generator=g)
            check_close(MOD.gemv(x, packed, table, bits, rows, cols, R, C, isa), x, w)
        x = torch.randn(PREFILL, cols, generator=g)
        check_close(MOD.linear_tiled(x, packed, table, bits, rows, cols, R, C, 0, isa), x, w)
        check_close(MOD.linear_tiled(x, packed, table, bits, rows, cols, R, C, 5, isa), x, w)  # several tiles
        ids = torch.randint(0, rows, (11,), generator=g)
        assert torch.equal(MOD.decode_rows(packed, table, ids, bits, rows, cols, R, C, isa), w[ids])
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_wide_tables_not_fp16_exact(bits, isa):
    """fp32 / bf16 tables that fp16 cannot hold exactly: the fp16-table SIMD path must not be used."""
    rows, cols = 40, 96
    for table_dtype in (torch.float32, torch.bfloat16):
        idx, table = make(rows, cols, rows, cols, bits, seed=bits, table_dtype=table_dtype)
        table[0, 0, 0] = 1e-7 if table_dtype == torch.float32 else 2.0**-30
        w = dense(idx, table, rows, cols)
        packed = MOD.pack_rows(idx, bits)
        x = torch.randn(3, cols)
        check_close(MOD.gemv(x, packed, table, bits, rows, cols, rows, cols, isa), x, w)
        assert torch.equal(MOD.decode_rows(packed, table, torch.arange(rows), bits, rows, cols, rows, cols, isa), w)


def test_paths_used():
    """On an AVX-512 machine the fast paths really run for the benchmark layouts."""
    if "avx512" not in SUPPORTED:
        pytest.skip("no AVX-512")
    t16 = torch.randn(1, 1, 256).half().float()
    assert MOD.gemv_path(t16, 8, 64, 576, 64, 576, "auto") in ("avx512vbmi", "avx512")
    assert MOD.gemv_path(t16[..., :128], 7, 64, 576, 64, 576, "auto") == "avx512"
    assert MOD.gemv_path(torch.randn(1, 1, 256) / 3, 8, 64, 576, 64, 576, "auto") == "generic"
    assert MOD.gemv_path(torch.randn(64, 3, 8), 3, 64, 576, 1, 192, "avx512") == "avx512"
    assert MOD.gemv_path(torch.randn(64, 36, 8), 3, 64, 576, 1, 16, "avx512") == "avx512"
    assert MOD.gemv_path(torch.randn(64, 72, 8), 3, 64, 576, 1, 8, "avx512") == "generic"


@pytest.mark.parametrize("isa", ["avx512vbmi", "avx512"])
@pytest.mark.parametrize(
    "rows,cols,R,C",
    [
        (33, 100, 33, 100),
        (20, 576, 1, 576),
        (20, 576, 1, 64),
        (20, 576, 1, 192),
        (9, 1100, 1, 1100),
        (48, 192, 1, 32),
        (5, 64, 5, 64),
    ],
)
def test_8bit_paths(rows, cols, R, C, isa):
    """8 bits on AVX-512 with (isa "avx512vbmi") and without (isa "avx512": vpermt2w) the VBMI byte-plane kernel."""
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU has no {isa}")
    idx, table = make(rows, cols, R, C, 8, seed=cols + R)
    w = dense(idx, table, R, C)
    packed = MOD.pack_rows(idx, 8)
    for T in (1, 2, 3, 8, 9, 20):
        x = torch.randn(T, cols)
        check_close(MOD.gemv(x, packed, table, 8, rows, cols, R, C, isa), x, w)


def test_pack_layout_bits():
    """The documented layout: 3 bits, column c -> lane c % 16, slot c // 16, lane-stream LSB first."""
    cols = 16 * 11  # 11 slots -> 33 bits per lane -> 2 blocks, slot 10 straddles blocks 0 and 1
    idx = torch.zeros(1, cols, dtype=torch.uint8)
    idx[0, 10 * 16 + 5] = 0b101  # lane 5, slot 10: lane-stream bits 30, 31 (block 0), 32 (block 1)
    p = MOD.pack_rows(idx, 3)
    assert p.shape == (1, 64 + 16)  # block 1 holds 1 bit per lane: 16 one-byte words
    words = p[0, :64].view(torch.int32)
    assert words[5].item() == 1 << 30 and p[0, 64 + 5].item() == 1
    assert int((p != 0).sum()) == 2


def test_round_trip_large_and_errors():
    for bits in range(1, 9):
        idx = torch.randint(0, 1 << bits, (17, 1537), dtype=torch.uint8)
        assert torch.equal(MOD.unpack_rows(MOD.pack_rows(idx, bits), bits, 1537), idx)
    with pytest.raises(RuntimeError):
        MOD.pack_rows(torch.full((2, 3), 8, dtype=torch.uint8), 3)
    with pytest.raises(RuntimeError):
        MOD.gemv(torch.randn(1, 4), torch.zeros(2, 64, dtype=torch.uint8), torch.zeros(1, 1, 4), 2, 2, 4, 2, 4, "bogus")


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_python_api_matches_edkm_semantics(bits):
    """PackedWeight.from_lut / linear / embedding as edkm's LUTWeight would compute them."""
    rows, cols = 24, 40
    k = 1 << bits
    for groups, n in ((1, rows * cols), (rows // 4, 4 * cols), (rows * 5, cols // 5)):
        lut = torch.randn(groups, k).half()
        idx = torch.randint(0, k, (groups, n), dtype=torch.uint8)
        for dtype in (torch.float32, torch.bfloat16):
            w = lut_cpu.PackedWeight.from_lut(lut, idx, torch.Size([rows, cols]), dtype)
            ref_w = lut.to(dtype).float()
            if n % cols == 0:
                ref_w = ref_w[torch.arange(rows)[:, None] // (n // cols), idx.view(rows, cols).long()]
            else:
                ref_w = ref_w.view(rows, cols // n, k)[
                    torch.arange(rows)[:, None], torch.arange(cols)[None] // n, idx.view(rows, cols).long()
                ]
            x = torch.randn(2, 3, cols)
            b = torch.randn(rows)
            for xx in (x, torch.randn(4, 50, cols)):
                y = lut_cpu.linear(xx, w, b)
                assert y.shape == (*xx.shape[:-1], rows)
                check_close(y.reshape(-1, rows) - b, xx.reshape(-1, cols), ref_w)
            ids = torch.tensor([[3, 0], [23, 3]])
            assert torch.equal(lut_cpu.embedding(ids, w), ref_w.to(dtype)[ids])


def test_load_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    mod, reason = lut_cpu.load(tmp_path)
    assert mod is None and "compiler" in reason and "\n" not in reason
