"""coremltools' post-training palettizers as peers: their clustered weights become our LUT layers unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("coremltools", reason="coremltools (the optional 'coreml' extra) is not installed")

import edkm  # noqa: E402
from edkm.config import EMBEDDING_LAYERS  # noqa: E402
from edkm.layers.lut import LUTModule  # noqa: E402
from edkm.peers.coreml_palettizers import coreml_kmeans_, coreml_skm_, lut_of_clustered  # noqa: E402

PLAN = edkm.PalettizeConfig(bits=3, overrides={EMBEDDING_LAYERS: {"bits": 8}})


def library_weights(model, rows):
    """What coremltools' PostTrainingPalettizer itself makes of every targeted weight."""
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    from edkm.peers.coreml_palettizers import coreml_config

    config = PostTrainingPalettizerConfig.from_dict(coreml_config(model, PLAN, rows))
    compressed = PostTrainingPalettizer(model, config).compress(inplace=False)
    return {n: m.weight.detach() for n, m in compressed.named_modules() if hasattr(m, "weight")}


@pytest.mark.parametrize("rows", [None, 16])
def test_coreml_kmeans_layers_decode_to_the_librarys_weights(tiny_causal_lm, rows):
    model = tiny_causal_lm("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    expected = library_weights(copy.deepcopy(model), rows)
    coreml_kmeans_(model, PLAN, rows)
    luts = {n: m.lut for n, m in model.named_modules() if isinstance(m, LUTModule)}
    assert len(luts) == 2 * 7 + 2 and luts["lm_head"] is luts["model.embed_tokens"]
    for name, lut in luts.items():
        groups = 1 if rows is None or lut.bits == 8 else lut.shape[0] // rows
        assert lut.lut.shape == (groups, 1 << lut.bits), name
        assert torch.equal(lut().float(), expected[name].half().float()), name  # fp16 LUT: the library's values


def test_coreml_skm_layers_decode_to_the_librarys_sensitive_kmeans(tiny_causal_lm):
    from coremltools.optimize.torch.palettization import SKMPalettizer, SKMPalettizerConfig

    from edkm.peers.coreml_palettizers import coreml_config

    model = tiny_causal_lm("llama").eval()
    seqs = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))
    config = SKMPalettizerConfig.from_dict({**coreml_config(model, PLAN, None), "calibration_nsamples": 4})
    loss = lambda m, s: torch.nn.functional.cross_entropy(m(s[None, :-1]).logits[0], s[1:])  # noqa: E731
    library = SKMPalettizer(copy.deepcopy(model), config).compress(dataloader=list(seqs), loss_fn=loss)
    skm = coreml_skm_(copy.deepcopy(model), seqs, PLAN)
    plain = coreml_kmeans_(copy.deepcopy(model), PLAN)
    q = skm.model.layers[0].self_attn.q_proj.lut
    assert torch.equal(q().float(), library.model.layers[0].self_attn.q_proj.weight.detach().half().float())
    assert not torch.equal(q.lut, plain.model.layers[0].self_attn.q_proj.lut.lut)  # the sensitivities count


def test_a_weight_with_too_many_values_is_refused():
    with pytest.raises(ValueError, match="holds 5 distinct values, more than 2"):
        lut_of_clustered(torch.arange(5.0).reshape(1, 5), 2)
