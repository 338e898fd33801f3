"""Packed-layer kernels: every path exact to decode-then-matmul; no whole fp32 weight per call or kept."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from edkm import decode
from edkm.kernels import gemv, linear, lut_gemv
from edkm.kernels.layout import grid
from edkm.layers.lut import LUTModule, LUTWeight, set_lut_kernel

ROWS, COLS = 24, 32
# groups: one LUT per tensor, per block of 4 rows (DKM's group_size), per 8 input columns (RTN's group_size)
LAYOUTS = {"tensor": 1, "row_blocks": ROWS // 4, "col_groups": ROWS * COLS // 8}


def make_lut_weight(bits: int, groups: int, shape=(ROWS, COLS), seed: int = 0, dtype=torch.float32) -> LUTWeight:
    gen = torch.Generator().manual_seed(seed)
    k = 1 << bits
    lut = (torch.randn(groups, k, generator=gen) * 0.1).half()
    numel = shape[0] * shape[1]
    idx = torch.randint(0, k, (groups, numel // groups), generator=gen).to(torch.uint8)
    return LUTWeight(lut, idx, torch.Size(shape), bits, dtype)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


class WholeWeightWatch(TorchDispatchMode):
    """Records every floating-point op output with at least ``numel`` elements (except LUT-sized ones)."""

    def __init__(self, numel: int, lut_numel: int = -1) -> None:
        super().__init__()
        self.numel, self.lut_numel, self.seen = numel, lut_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and t.is_floating_point()
                and t.numel() >= self.numel
                and t.numel() != self.lut_numel
            ):
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 5])
def test_eager_linear_exact(bits, layout, tokens):
    w = make_lut_weight(bits, LAYOUTS[layout])
    w.set_kernel("eager")
    x, bias = torch.randn(2, tokens, COLS), torch.randn(ROWS)
    ref = F.linear(x, decode(w.lut, w.indices, w.shape, w.dtype), bias)
    assert rel_err(w.linear(x, bias), ref) <= 1e-5
    # tiles of one row: the decoded buffer never holds the whole weight
    assert rel_err(linear.tiled_linear(x, w.lut, w.indices, w.shape, w.dtype, bias, tile_bytes=1), ref) <= 1e-5


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_fused_gemv_math_exact(bits, layout, tokens):
    """The fused GEMV's ops run eagerly (what torch.compile compiles): select tree / gather decode."""
    w = make_lut_weight(bits, LAYOUTS[layout], seed=bits)
    views = grid(w.lut, w.indices, w.shape)
    x = torch.randn(tokens, COLS)
    ref = F.linear(x, w())
    assert rel_err(lut_gemv(x, views.indices, views.lut.float()), ref) <= 1e-5


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ids_shape", [(1, 1), (3, 7)])
def test_embedding_exact_and_gathers_rows_only(bits, layout, ids_shape):
    w = make_lut_weight(bits, LAYOUTS[layout], seed=3)
    module = LUTModule(nn.Embedding(ROWS, COLS, padding_idx=0), w)
    ids = torch.randint(0, ROWS, ids_shape)
    ref = F.embedding(ids, w(), padding_idx=0)
    with WholeWeightWatch(ROWS * COLS, w.lut.numel()) as watch:
        out = module(ids) if ids.numel() < ROWS else w.embedding(ids[:1, :3])
    assert not watch.seen, watch.seen
    if ids.numel() < ROWS:
        assert torch.equal(out, ref)
    assert torch.equal(module(ids), ref)
    with pytest.raises(IndexError, match="embedding ids"):
        module(torch.tensor([ROWS]))


@pytest.mark.parametrize("tokens", [1, 6])
def test_gradients_without_a_whole_weight(tokens, monkeypatch):
    monkeypatch.setattr(linear, "fused_gemv", lambda: gemv.FusedGemv(enabled=False))  # tiled here; compiled: slow tests
    monkeypatch.setattr(linear, "TILE_BYTES", COLS * 4 * 4)
    w = make_lut_weight(4, LAYOUTS["row_blocks"])
    module = LUTModule(nn.Linear(COLS, ROWS), w)
    x = torch.randn(2, tokens, COLS, requires_grad=True)
    with WholeWeightWatch(ROWS * COLS, w.lut.numel()) as watch:
        module(x).square().sum().backward()
    assert not watch.seen, watch.seen
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = module.bias.detach().clone().requires_grad_()
    F.linear(x_ref, w(), bias_ref).square().sum().backward()
    assert rel_err(x.grad, x_ref.grad) <= 1e-5 and rel_err(module.bias.grad, bias_ref.grad) <= 1e-5


def test_bf16_layer_exact():
    w = make_lut_weight(4, LAYOUTS["row_blocks"], dtype=torch.bfloat16)
    x = torch.randn(3, COLS, dtype=torch.bfloat16)
    ref = F.linear(x, w()).float()
    assert rel_err(w.linear(x).float(), ref) <= 1e-2  # bf16 outputs: only the rounding of the result differs
    views = grid(w.lut, w.indices, w.shape)
    assert (
        rel_err(
            lut_gemv(x[:1].float(), views.indices, views.lut.to(torch.bfloat16).float()),
            F.linear(x[:1].float(), w().float()),
        )
        <= 1e-5
    )


def test_no_whole_fp32_weight_per_call_or_between_calls(monkeypatch):
    monkeypatch.setattr(linear, "fused_gemv", lambda: gemv.FusedGemv(enabled=False))
    monkeypatch.setattr(linear, "TILE_BYTES", COLS * 4 * 4)  # 4 rows per tile
    w = make_lut_weight(3, LAYOUTS["row_blocks"])
    module = LUTModule(nn.Linear(COLS, ROWS), w)
    before = {n: t.data_ptr() for n, t in module.state_dict().items()}
    for tokens in (1, 6):
        with torch.no_grad(), WholeWeightWatch(ROWS * COLS, w.lut.numel()) as watch:
            module(torch.randn(tokens, COLS))
        assert not watch.seen, watch.seen
    kept = [t for t in [*module.state_dict().values(), *vars(w).values()] if isinstance(t, torch.Tensor)]
    assert not any(t.is_floating_point() and t.numel() >= ROWS * COLS for t in kept)
    assert {n: t.data_ptr() for n, t in module.state_dict().items()} == before
    assert w.indices.dtype == torch.uint8 and w.indices.numel() == ROWS * COLS  # 1 byte per weight resident


def test_compile_failure_falls_back_to_exact_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    fused = gemv.FusedGemv()
    monkeypatch.setattr(linear, "fused_gemv", lambda: fused)
    monkeypatch.setattr(linear, "native_weight", lambda *args: None)  # as without a C++ compiler
    monkeypatch.setattr(torch, "compile", broken)
    w = make_lut_weight(3, 1)
    x = torch.randn(1, COLS)
    with pytest.warns(UserWarning, match="no C"):
        y = w.linear(x)
    assert rel_err(y, F.linear(x, w())) <= 1e-5
    assert fused.failed and "no C++ compiler" in fused.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        w.linear(x)


def test_compile_off_by_option():
    assert (
        gemv.FusedGemv(enabled=False)(
            torch.ones(1, 2), torch.zeros(1, 1, 1, 2, dtype=torch.uint8), torch.zeros(1, 1, 1, 2)
        )
        is None
    )


def test_decode_kernel_and_int8_option():
    w = make_lut_weight(3, LAYOUTS["row_blocks"])
    module = LUTModule(nn.Linear(COLS, ROWS), w)
    x = torch.randn(4, COLS)
    ref = F.linear(x, w(), module.bias)
    set_lut_kernel(module, "decode")
    assert torch.equal(module(x), ref)
    set_lut_kernel(module, "int8")
    assert w.int8 is not None and 0 < w.int8.max_rel_error <= 1 / 254
    # per weight |err| <= max|w| / 254, so |y err| <= sum|x| * max|w| / 254
    bound = x.abs().sum(1, keepdim=True) * w().abs().max() * w.int8.max_rel_error
    with torch.no_grad():
        assert ((module(x) - ref).abs() <= bound + 1e-6).all()
    set_lut_kernel(module, "auto")
    assert w.int8 is None
    with pytest.raises(ValueError, match="unknown LUT kernel"):
        set_lut_kernel(module, "fast")


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_linear_exact(bits, layout):
    """The compiled fused GEMV (minutes in all: one compile per shape and bit width)."""
    w = make_lut_weight(bits, LAYOUTS[layout], seed=bits)
    for tokens in (1, 3):
        x = torch.randn(tokens, COLS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                y = w.linear(x)
        assert not [c for c in caught if "edkm" in str(c.message)]  # a compile failure would warn and fall back
        assert rel_err(y, F.linear(x, w())) <= 1e-5
    assert linear.fused_gemv().failed is None
