"""palettize_ -> train -> finalize_ -> save -> load, tied weights, per-group LUTs, and bad input."""

import json
import struct

import pytest
import torch
from torch import nn

import edkm
from edkm.export.format import read_header


class Tiny(nn.Module):
    """Embedding tied to the output layer, two linears in between."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(self.embed(x)))))


CONFIG = dict(bits=3, overrides={"embed|head": {"bits": 8}})


def trained(config=None):
    model = Tiny()
    edkm.palettize_(model, config or edkm.PalettizeConfig(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 8))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 64), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_tied_weight_clustered_once_and_trainable():
    model = trained()
    assert model.embed.clusterer is model.head.clusterer
    assert model.embed.clusterer.spec.bits == 8 and model.up.clusterer.spec.bits == 3
    assert model.embed.weight is model.head.weight and model.embed.weight.grad is not None


@pytest.mark.parametrize("group_size", [None, 8])
def test_eval_equals_finalized_equals_loaded(tmp_path, group_size):
    model = trained(edkm.PalettizeConfig(**CONFIG, group_size=group_size))
    x = torch.randint(0, 64, (2, 8))
    model.eval()
    prepared = model(x)
    edkm.finalize_(model)
    finalized = model(x)
    assert torch.equal(prepared, finalized)
    assert len({id(m.lut) for m in (model.embed, model.head)}) == 1
    edkm.save_palettized(model, tmp_path / "m.safetensors")
    loaded = edkm.load_palettized(tmp_path / "m.safetensors", Tiny())
    assert torch.equal(loaded(x), finalized)
    header = read_header(tmp_path / "m.safetensors")
    assert header["layers"]["embed"]["modules"] == ["embed", "head"]


def test_size_on_disk_within_two_percent(tmp_path):
    model = edkm.ptq_kmeans_(nn.Sequential(nn.Linear(512, 512), nn.LayerNorm(512)), edkm.PalettizeConfig(bits=3))
    edkm.save_palettized(model, tmp_path / "m.safetensors")
    expected = 512 * 512 * 3 / 8 + 8 * 2 + (512 + 512 + 512) * 4  # indices + LUT + bias and LayerNorm (fp32)
    size = (tmp_path / "m.safetensors").stat().st_size
    assert abs(size - expected) / expected < 0.02


def test_rtn_per_channel_and_group():
    w = torch.randn(6, 8)
    lin = nn.Linear(8, 6)
    lin.weight.data = w.clone()
    edkm.rtn_(nn.Sequential(lin), edkm.PalettizeConfig(bits=8), group_size=4)
    assert (lin_w := nn.Sequential(lin)[0].weight).shape == (6, 8)
    assert (lin_w - w).abs().max() < (w.max() - w.min()) / 255  # 8-bit uniform: within one step


def test_bad_config():
    with pytest.raises(ValueError, match="bits must be an integer from 1 to 8"):
        edkm.PalettizeConfig(bits=9)
    with pytest.raises(ValueError, match="bits must be an integer from 1 to 8"):
        edkm.PalettizeConfig(overrides={"up": {"bits": 0}})
    with pytest.raises(ValueError, match="does not divide"):
        edkm.palettize_(Tiny(), edkm.PalettizeConfig(group_size=5))
    with pytest.raises(ValueError, match="matches no"):
        edkm.palettize_(Tiny(), edkm.PalettizeConfig(include=["q_proj"]))
    with pytest.raises(ValueError, match="matches no"):
        edkm.palettize_(Tiny(), edkm.PalettizeConfig(overrides={"lm_head": {"bits": 8}}))


def saved(tmp_path):
    model = edkm.rtn_(Tiny(), edkm.PalettizeConfig(bits=3))
    path = tmp_path / "m.safetensors"
    edkm.save_palettized(model, path)
    return path


def test_corrupted_truncated_and_newer_files(tmp_path):
    path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        edkm.load_palettized(tmp_path / "flip.safetensors", Tiny())
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        edkm.load_palettized(tmp_path / "cut.safetensors", Tiny())
    with pytest.raises(FileNotFoundError):
        edkm.load_palettized(tmp_path / "missing.safetensors")
    rewrite_header(path, tmp_path / "new.safetensors", lambda header: header.update(version=99))
    with pytest.raises(ValueError, match="newer"):
        edkm.load_palettized(tmp_path / "new.safetensors", Tiny())


def rewrite_header(path, out, edit):
    """Copy the packed file ``path`` to ``out`` with ``edit(header)`` applied to its edkm header."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8 : 8 + n])
    header = json.loads(meta["__metadata__"]["edkm"])
    edit(header)
    meta["__metadata__"]["edkm"] = json.dumps(header)
    blob = json.dumps(meta).encode()
    blob += b" " * (-len(blob) % 8)
    out.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_rtn_stores_min_and_scale_and_reloads_exactly(tmp_path):
    from safetensors import safe_open

    model = edkm.rtn_(nn.Sequential(nn.Linear(512, 512)), edkm.PalettizeConfig(bits=8))
    path = tmp_path / "rtn.safetensors"
    edkm.save_palettized(model, path)
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == ["0.bias", "0.indices", "0.lo", "0.step"]
    expected = 512 * 512 + 512 * (4 + 4) + 512 * 4  # 8-bit indices + fp32 min and scale per row + bias
    assert abs(path.stat().st_size - expected) / expected < 0.02  # a 256-level fp16 LUT per row would add 256 kB
    loaded = edkm.load_palettized(path, nn.Sequential(nn.Linear(512, 512)))
    assert loaded[0].lut.uniform and torch.equal(loaded[0].weight, model[0].weight)


def test_version_1_files_still_load(tmp_path):
    from safetensors.torch import load_file

    from edkm.export.layers import digest

    model = edkm.ptq_kmeans_(Tiny(), edkm.PalettizeConfig(bits=3))
    edkm.save_palettized(model, tmp_path / "v3.safetensors")

    def to_v1(header):  # version 1: no "levels", checksum over the tensors only
        header["version"] = 1
        header["sha256"] = digest(load_file(tmp_path / "v3.safetensors"))
        for layer in header["layers"].values():
            del layer["levels"]

    rewrite_header(tmp_path / "v3.safetensors", tmp_path / "v1.safetensors", to_v1)
    loaded = edkm.load_palettized(tmp_path / "v1.safetensors", Tiny())
    x = torch.randint(0, 64, (2, 8))
    assert torch.equal(loaded(x), model(x))


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = saved(tmp_path)
    before = path.read_bytes()
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        edkm.save_palettized(edkm.rtn_(Tiny(), edkm.PalettizeConfig(bits=2)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_requires_finalized_model(tmp_path):
    with pytest.raises(ValueError, match="finalize_"):
        edkm.save_palettized(Tiny(), tmp_path / "x.safetensors")
