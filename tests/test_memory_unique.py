"""Uniquification (U): narrowest index, per-group keys, clear errors."""

from __future__ import annotations

import pytest
import torch

import edkm
from edkm.memory import track_saved
from edkm.memory.unique import build_index, narrow_index, widen


@pytest.mark.parametrize(
    "rows,dtype", [(1, torch.uint8), (256, torch.uint8), (257, torch.int16), (65536, torch.int16), (65537, torch.int32)]
)
def test_index_dtype_is_the_narrowest_and_round_trips(rows, dtype):
    inverse = torch.tensor([0, rows - 1, rows // 2])
    index, offset = narrow_index(inverse, rows)
    assert index.dtype == dtype
    assert torch.equal(widen(index, offset), inverse)


def test_build_index_per_tensor_and_per_group():
    w = torch.tensor([[0.5, 1.0, 0.5, 2.0], [1.0, 1.0, 0.5, 3.0]], dtype=torch.bfloat16)
    one = build_index(w, 1)
    assert one.rows == 4 and one.index.dtype == torch.uint8
    assert torch.equal(w.reshape(-1).float()[one.rep][widen(one.index, one.offset)], w.reshape(-1).float())
    two = build_index(w, 2)  # (group, value) pairs: {0.5, 1, 2} and {1, 0.5, 3}
    assert two.rows == 6
    keys = torch.arange(2).repeat_interleave(4) * 10 + w.reshape(-1).float()
    assert torch.equal(keys[two.rep][widen(two.index, two.offset)], keys)


def test_build_index_rejects_non_sixteen_bit_values():
    with pytest.raises(ValueError, match="needs exact 16-bit weights"):
        build_index(torch.tensor([0.1, 0.2]), 1)
    assert build_index(torch.tensor([0.5, 0.25]), 1).rows == 2  # fp32 holding bf16 values is fine


def test_few_distinct_values_give_a_uint8_index_and_tiny_rows():
    torch.manual_seed(0)
    w = torch.randint(-20, 20, (128, 96)).to(torch.bfloat16) / 16  # 40 distinct values
    c = edkm.kmeans1d(w.float(), 8)[0]
    wg = w.clone().requires_grad_()
    with track_saved() as stats:
        out, _ = edkm.dkm(wg, c, tau=0.01, iters=3, memory="marshal+unique")
    out.float().sum().backward()
    assert stats.kinds["index"] == w.numel()  # one byte per weight
    assert stats.kinds["rows"] <= 4 * 40 * (8 + 8 + 1) * 4  # 4 soft assignments: diff, A, x rows


def test_per_group_dedup_keeps_groups_apart():
    """The same value in two groups has different rows (different centroids): gradients still exact."""
    w = torch.tensor([0.5, 1.0, 0.25, 0.5, 1.0, 0.25] * 4, dtype=torch.bfloat16).reshape(2, 12)
    c = torch.tensor([[0.0, 0.5, 1.0, 2.0], [0.25, 0.75, 1.5, 3.0]])
    grads = []
    for memory in ("plain", "unique"):
        wg = w.clone().requires_grad_()
        out, cn = edkm.dkm(wg, c, tau=0.05, iters=2, memory=memory)
        (out.float() * torch.arange(24.0).reshape(2, 12)).sum().backward()
        grads.append((out, cn, wg.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
