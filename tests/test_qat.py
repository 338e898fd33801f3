"""torchao QAT peer: the prepared model fake-quantizes, equals torchao's converted model, and exports as LUT layers."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from edkm.config import PalettizeConfig  # noqa: E402
from edkm.layers.lut import LUTModule  # noqa: E402
from edkm.models import load_causal_lm  # noqa: E402
from edkm.peers.qat import convert_qat_, prepare_qat_, qat_to_lut_  # noqa: E402


@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, None)])
def test_qat_fake_quantizes_and_equals_its_converted_model(bits, group_size, tmp_path):
    model, _ = load_causal_lm(None)
    fp = copy.deepcopy(model).eval()
    plan = PalettizeConfig(bits=bits, overrides={"embed_tokens|lm_head": {"bits": 8}})
    prepare_qat_(model, plan, group_size)
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    model.train()
    model(x).logits.float().logsumexp(-1).mean().backward()  # trains: gradients reach the fp weights
    q = model.model.layers[0].mlp.down_proj  # 172 inputs: per channel even with group_size 32
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        fake, ref = model(x).logits, fp(x).logits
        assert (fake - ref).abs().max() > 1e-2  # the forward is quantized
        convert_qat_(model)
        assert hasattr(model.model.layers[0].self_attn.q_proj.weight, "qdata")  # torchao's int weights
        torch.testing.assert_close(model(x).logits, fake, rtol=0, atol=1e-5)
        qat_to_lut_(model)
        assert isinstance(model.model.layers[0].self_attn.q_proj, LUTModule) and isinstance(model.lm_head, LUTModule)
        # the LUT layers hold the same integers and scales (fp16-rounded): the same model to fp16 precision
        torch.testing.assert_close(model(x).logits, fake, rtol=0, atol=0.05 * fake.abs().max().item())
    groups = model.model.layers[0].self_attn.q_proj.lut.lo.shape[0]
    assert groups == 64 * (64 // group_size if group_size else 1)


def test_torchao_post_training_intx_becomes_lut_layers_of_its_integers():
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from edkm.peers.qat import intx_ptq_

    model, _ = load_causal_lm(None)
    ref = copy.deepcopy(model)
    config = IntxWeightOnlyConfig(weight_dtype=torch.int3, granularity=PerGroup(32))
    quantize_(ref, config, filter_fn=lambda m, n: type(m) is nn.Linear and m.in_features % 32 == 0)
    plan = PalettizeConfig(bits=3, overrides={"embed_tokens|lm_head": {"bits": 8}})
    intx_ptq_(model, plan, 32)
    assert isinstance(model.lm_head, LUTModule)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.4.mlp.up_proj"):  # 64 / 172 x 64: 2 groups per row
        q, expected = model.get_submodule(name), ref.get_submodule(name).weight.dequantize()
        assert isinstance(q, LUTModule) and q.lut.lo.shape[0] == expected.shape[0] * 2
        # torchao's own integers and scales; ours hold the scale and zero point in fp16
        torch.testing.assert_close(q.lut().float(), expected, rtol=0, atol=2e-3 * expected.abs().max().item())
