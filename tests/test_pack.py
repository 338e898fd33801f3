"""Dense b-bit packing: exact round trips for every width and awkward lengths."""

import pytest
import torch

from edkm.export.pack import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 5, 8, 13, 1000, 4099])
def test_round_trip_exact(bits, n):
    values = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), values)


def test_known_layout_lsb_first():
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b111001]


def test_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="values must lie"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="expected"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 10)
