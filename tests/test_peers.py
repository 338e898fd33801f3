"""Post-training peers: GPTQ, Fisher-weighted k-means (SqueezeLLM-style), on small layers and the bundled model."""

import copy

import pytest
import torch

import edkm
from edkm.cluster import kmeans1d
from edkm.peers import gptq, gptq_uniform, rtn_lut, weighted_error, weighted_kmeans


def correlated_inputs(n=512, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix * torch.linspace(0.2, 3, d)


@pytest.mark.parametrize("group_size", [None, 8, 0])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_below_rtn(group_size, act_order):
    x = correlated_inputs()
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    h = 2 * x.T.double() @ x.double() / len(x)
    idx, lo, step = gptq_uniform(w, h, bits=3, group_size=group_size, act_order=act_order, block_size=8)
    from edkm.layers.lut import LUTWeight

    q_gptq = LUTWeight.from_uniform(lo, step, idx, w.shape, 3, torch.float32)()
    q_rtn = rtn_lut(w, 3, group_size)()
    err = lambda q: float((x @ (w - q).T).square().sum())  # noqa: E731
    assert err(q_gptq) < 0.95 * err(q_rtn)
    # the GPTQ result lies on the same grid as RTN's (one scale and zero point per group)
    assert torch.equal(lo, rtn_lut(w, 3, group_size).lo)


def test_gptq_single_column_matches_closed_form_optimum():
    """Quantize column 0 only (the others are free): GPTQ's update of the rest is the least-squares optimum."""
    x = correlated_inputs(d=6).double()
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(2)).double()
    h = 2 * x.T @ x
    q0 = torch.round(w[:, 0] * 2) / 2
    keep = lambda col, j: q0.float() if j == 0 else col  # noqa: E731
    q = gptq(w, h, keep, damp=0.0, act_order=False, block_size=4).double()
    # argmin_R ||X_0 q0^T + X_R R^T - X W^T||^2  =>  R = W_R + (w_0 - q0) (X_R^T X_R)^-1 X_R^T X_0
    xr, x0 = x[:, 1:], x[:, :1]
    coef = torch.linalg.solve(xr.T @ xr, xr.T @ x0).squeeze(1)
    expected = w[:, 1:] + (w[:, 0] - q0).unsqueeze(1) * coef.unsqueeze(0)
    assert torch.equal(q[:, 0], q0)
    torch.testing.assert_close(q[:, 1:], expected, rtol=1e-4, atol=1e-5)


def test_gptq_rejects_a_hessian_of_the_wrong_size():
    with pytest.raises(ValueError, match="does not fit"):
        gptq(torch.randn(4, 8), torch.eye(7), lambda c, j: c)


@pytest.mark.parametrize("groups", [None, 1])
def test_weighted_kmeans_reduces_weighted_error_vs_plain_kmeans(groups):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 256, generator=g)
    fisher = torch.rand(8, 256, generator=g) ** 6 * 100  # a few weights matter much more than the rest
    lut, idx = weighted_kmeans(w, fisher, 8, groups=groups)
    rows = w.reshape(groups or 8, -1)
    plain = torch.cat([kmeans1d(r, 8) for r in rows]).half()
    plain_idx = torch.searchsorted(((plain[:, :-1].float() + plain[:, 1:].float()) / 2).contiguous(), rows.contiguous())
    assert weighted_error(w, fisher, lut, idx) < 0.9 * weighted_error(w, fisher, plain, plain_idx)
    # uniform weights: the plain k-means objective, no worse than kmeans1d's
    ones = torch.ones_like(w)
    lut1, idx1 = weighted_kmeans(w, ones, 8, groups=groups)
    assert weighted_error(w, ones, lut1, idx1) <= weighted_error(w, ones, plain, plain_idx) * 1.001


def test_awq_scaling_lowers_output_error_with_outlier_channels():
    from edkm.peers.awq import best_scale

    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g) * torch.where(torch.arange(64) < 4, 20.0, 1.0)  # 4 salient channels
    w = torch.randn(32, 64, generator=g)
    s = best_scale(x, [w], bits=3, group_size=32)
    err = lambda q, xs: float((x @ w.T - xs @ q.T).square().sum())  # noqa: E731
    rtn = err(rtn_lut(w, 3, 32)(), x)
    awq = err(rtn_lut(w * s, 3, 32)(), x / s)
    assert awq < 0.9 * rtn and s[:4].mean() > s[4:].mean()


def test_hqq_layer_equals_the_library_dequantization():
    pytest.importorskip("hqq")
    from hqq.core.quantize import Quantizer

    from edkm.peers.hqq import hqq_lut

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    lut = hqq_lut(w, 3, 32)
    w_q, meta = Quantizer.quantize(
        w,
        nbits=3,
        channel_wise=True,
        group_size=32,
        optimize=True,
        axis=1,
        bitpack=False,
        device="cpu",
        compute_dtype=torch.float32,
    )
    torch.testing.assert_close(lut(), Quantizer.dequantize(w_q, meta), rtol=0, atol=2e-3 * w.abs().max().item())
    assert lut.lo.shape == (32, 1) and lut.lo.dtype == torch.float16


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gptq_on_cached_block_inputs_equals_whole_model_passes(arch, tiny_causal_lm, monkeypatch):
    """GPTQ calibrates block i on the outputs of the quantized blocks before it: cached block inputs (O(layers))
    give bit for bit the Hessians of a whole-model forward per block (O(layers^2))."""
    import copy
    import importlib
    from types import SimpleNamespace

    from edkm.config import PalettizeConfig
    from edkm.layers.lut import LUTModule
    from edkm.peers import calibrate, gptq_

    gptq_module = importlib.import_module("edkm.peers.gptq")  # the module (edkm.peers.gptq is also a function)
    base = tiny_causal_lm(arch)
    sequences = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(0))
    plan = PalettizeConfig(bits=3, exclude=["lm_head"])
    cached = gptq_(copy.deepcopy(base), sequences, plan)
    calls = []
    whole_pass = SimpleNamespace(
        hessians=lambda m, names: calls.append(names) or calibrate.input_hessians(m, names, sequences)
    )
    monkeypatch.setattr(gptq_module, "BlockInputs", lambda _sequences: whole_pass)  # the O(layers^2) reference
    whole = gptq_(copy.deepcopy(base), sequences, plan)
    luts = [(n, m.lut) for n, m in cached.named_modules() if isinstance(m, LUTModule)]
    assert len(luts) >= 4 and len(calls) >= 2  # the reference ran, once per block
    for name, lut in luts:
        ref = whole.get_submodule(name).lut
        assert torch.equal(lut.indices, ref.indices) and torch.equal(lut.lut, ref.lut), name


def test_importance_weighted_kmeans_equals_kmeans_of_repeated_values():
    """Integer importance = multiplicity: weighting a value by n is k-means of the value written n times."""
    torch.manual_seed(0)
    w = torch.randn(6, 40).to(torch.bfloat16)
    reps = torch.randint(0, 4, (1, 40))  # per column, zeros included: those values do not count
    repeated = torch.cat([w[:, j].repeat(int(reps[0, j])) for j in range(40)])
    for groups in (1, 3):
        weighted = kmeans1d(w, 4, groups=groups, importance=reps.float())
        plain = torch.stack([kmeans1d(torch.cat([g[:, j].repeat(int(reps[0, j])) for j in range(40)]), 4)[0]
                             for g in w.reshape(groups, -1, 40)])  # fmt: skip
        torch.testing.assert_close(weighted, plain, rtol=1e-6, atol=1e-7)
    assert repeated.numel() == int(reps.sum()) * 6
    with pytest.raises(ValueError, match="non-negative"):
        kmeans1d(w, 4, importance=-torch.ones(1, 40))


def test_activation_aware_warm_start_keeps_the_weight_a_large_activation_multiplies():
    """A "super weight": one large weight on the input column with large activations. Plain per-tensor k-means
    clips it; activation-aware k-means (warm_start_ / ptq_kmeans_ with input_importance) keeps a centroid for it,
    and the layer's output error drops (0.62 -> 0.15 here)."""
    import edkm
    from edkm.peers.calibrate import input_importance

    torch.manual_seed(0)
    layer = torch.nn.Linear(1024, 256, bias=False)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.weight[7, 3] = 0.8
    x = torch.randn(64, 1024)
    x[:, 3] *= 100.0  # the massive activation channel
    imp = input_importance(torch.nn.Sequential(layer), x)
    torch.testing.assert_close(imp["0"], x.double().square().mean(0).float().unsqueeze(0))
    cfg = edkm.PalettizeConfig(bits=3)
    errors, top = {}, {}
    for name, importance in (("plain", None), ("activation", imp)):
        model = edkm.ptq_kmeans_(copy.deepcopy(torch.nn.Sequential(layer)), cfg, importance)
        with torch.no_grad():
            errors[name] = float((model(x) - layer(x)).norm() / layer(x).norm())
        top[name] = float(model[0].lut.lut.max())
    assert top["plain"] < 0.4 < 0.7 < top["activation"], top  # the 0.8 weight clipped / kept
    assert errors["activation"] < errors["plain"] / 3, errors


def test_fisher_kmeans_of_an_8bit_layer_runs_on_distinct_values_with_the_same_result(tiny_causal_lm):
    """squeeze_ clusters the 8-bit embedding on its distinct values weighted by their counts: the LUT and indices of
    the weighted k-means of every weight with weight 1 (seconds instead of minutes on SmolLM2's 28 M weights)."""
    from edkm.config import EMBEDDING_LAYERS
    from edkm.peers.squeeze import squeeze_

    model = tiny_causal_lm("llama")
    with torch.no_grad():  # repeated values, as 16-bit weights have
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.to(torch.bfloat16).float())
    weight = model.model.embed_tokens.weight.detach().clone()
    plan = edkm.PalettizeConfig(bits=3, overrides={EMBEDDING_LAYERS: {"bits": 8}})
    seqs = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    lut = squeeze_(model, seqs, plan).model.embed_tokens.lut
    expected_lut, expected_idx = weighted_kmeans(weight, torch.ones_like(weight), 256, groups=1)
    assert torch.equal(lut.lut, expected_lut) and torch.equal(lut.indices.reshape(-1), expected_idx.reshape(-1))


def test_fisher_warm_start_weights_low_bit_layers_by_fisher_and_the_8bit_head_by_activations(tiny_causal_lm):
    """--warm-start fisher: each <= 4-bit linear layer's first centroids are the Fisher-weighted k-means of its
    weights (SqueezeLLM's objective, lower there than the activation-aware start's), while the 8-bit tied
    embedding / head keeps the activation weights (its Fisher is zero on tokens the calibration never shows)."""
    from edkm.config import EMBEDDING_LAYERS
    from edkm.data.text import PackedDataset
    from edkm.peers.calibrate import fisher_diagonal, warm_start_importance
    from edkm.peers.fast import calibration

    model = tiny_causal_lm("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    data = PackedDataset.from_tokens(torch.randint(0, 128, (40 * 17,), generator=torch.Generator().manual_seed(0)), 17)
    plan = edkm.PalettizeConfig(bits=2, overrides={EMBEDDING_LAYERS: {"bits": 8}})
    starts = ("activation", "fisher")
    imp = {w: warm_start_importance(model, calibration(data), w, plan) for w in starts}
    name = "model.layers.0.mlp.down_proj"
    fisher = fisher_diagonal(model, calibration(data))[id(model.get_submodule(name).weight)]
    assert torch.equal(imp["fisher"][name], fisher) and imp["activation"][name].shape == (1, 64)
    assert torch.equal(imp["fisher"]["lm_head"], imp["activation"]["lm_head"])
    assert warm_start_importance(model, calibration(data), "kmeans", plan) is None  # plain k-means
    errors = {}
    for warm, importance in imp.items():
        started = edkm.transform.warm_start_(edkm.palettize_(copy.deepcopy(model), plan), importance)
        layer = started.get_submodule(name)
        idx, lut = layer.clusterer.hard(layer.weight)
        errors[warm] = weighted_error(layer.weight, fisher, lut, idx)
    assert errors["fisher"] < errors["activation"], errors


def test_fast_peers_report_each_peer_as_it_ends_and_skip_the_finished_ones(tiny_causal_lm, tmp_path):
    """A stopped baselines phase resumes after its last finished peer: ``done`` gets each peer's entries as it
    ends (the job records them), and the peers named in ``skip`` are not built again."""
    from edkm.data.text import PackedDataset
    from edkm.peers.fast import FAST_PEERS, fast_peers

    model = tiny_causal_lm("llama")
    data = PackedDataset.from_tokens(torch.randint(0, 128, (40 * 17,), generator=torch.Generator().manual_seed(0)), 17)
    seen = []
    report = fast_peers(model, data, edkm.PalettizeConfig(bits=3), lambda m: 1.0, tmp_path,
                        lambda name, entry: seen.append((name, sorted(entry))), skip=FAST_PEERS[:3])  # fmt: skip
    assert [n for n, _ in seen] == list(FAST_PEERS[3:])
    assert seen[0][1] == [f"{FAST_PEERS[3]}_{k}" for k in ("bpw", "ppl", "size_bytes")]
    assert set(report) == {f"{n}_{k}" for n in FAST_PEERS[3:] for k in ("ppl", "size_bytes", "bpw")}
    assert not (tmp_path / f"{FAST_PEERS[0]}.edkm.safetensors").exists()
