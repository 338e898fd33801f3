"""The lean decode path (edkm.generation) computes what transformers' LlamaForCausalLM computes.

Metric: the last token's logits within ``1e-5 * max |logits|`` of the model's own forward (the same packed
weights; the lean path sums in another order), and greedy tokens identical to ``generate``'s. Covered: every bit
width 1-8, grouped LUTs (fused with repeated tables), unfusable and dense projections (the Python path),
the C++ decode step and the Python prefill, ``model.generate`` bound by ``from_pretrained`` and its fallbacks.
"""

from __future__ import annotations

import pytest
import torch

import edkm
from edkm.generation import LeanGenerate, LeanLlama, bind, lean_generate, unsupported_reason
from edkm.generation import weights as lean_weights
from edkm.kernels import native

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

HAS_KERNEL = native.available()
REL = 1e-5


def tiny_llama(seed: int = 0, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=120,
        max_position_embeddings=128,
        eos_token_id=None,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    cfg.update(extra)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((ours - ref).abs().max()) <= REL * float(ref.abs().max())


def check_against_model(model, steps: int = 5, prompt: int = 7) -> LeanLlama:
    """Prefill and ``steps`` decode steps of the lean model against the model's forward over the whole sequence."""
    lean = LeanLlama(model, prompt + steps + 1)
    ids = torch.randint(0, model.config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = lean.forward(ids)
        for _ in range(steps):
            ref = model(ids[None]).logits[0, -1]
            assert close(logits, ref), float((logits - ref).abs().max() / ref.abs().max())
            token = ref.argmax().reshape(1)
            ids = torch.cat([ids, token])
            logits = lean.forward(token)
    assert lean.position == prompt + steps
    return lean


@pytest.mark.parametrize("bits", range(1, 9))
def test_lean_forward_equals_the_model_at_every_bit_width(bits):
    model = edkm.rtn_(tiny_llama(), edkm.PalettizeConfig(bits=bits))
    lean = check_against_model(model)
    assert (lean.step is not None) == HAS_KERNEL  # the C++ step ran the decode steps
    assert all(p.fused for p in lean.projections()) == HAS_KERNEL


def test_grouped_luts_fuse_with_repeated_tables():
    # one LUT per 16 output rows in q/k/v (k/v have 32 rows, q 64): the fused weight has groups of 16 rows
    model = edkm.ptq_kmeans_(tiny_llama(vocab_size=128), edkm.PalettizeConfig(bits=3, group_size=16))
    lean = check_against_model(model)
    if HAS_KERNEL:
        assert lean.layers[0].qkv.parts[0].packed.R == 16


def test_unfusable_and_dense_projections_take_the_python_path():
    cfg = edkm.PalettizeConfig(bits=3, overrides={r"\.k_proj": {"bits": 4}}, exclude=[r"mlp\.down_proj"])
    model = edkm.rtn_(tiny_llama(), cfg)
    lean = check_against_model(model)
    assert lean.step is None
    assert len(lean.layers[0].qkv.parts) == 3  # q, k, v one by one (k has other bits)
    assert lean.layers[0].down.parts[0].packed is None  # a dense nn.Linear computes itself


def test_without_the_native_kernel_the_modules_compute(monkeypatch):
    monkeypatch.setattr(lean_weights, "is_native", lambda module: False)
    model = edkm.rtn_(tiny_llama(), edkm.PalettizeConfig(bits=4))
    lean = check_against_model(model, steps=2)
    assert lean.step is None and not any(p.fused for p in lean.projections())


def test_untied_head_and_dense_model():
    check_against_model(edkm.rtn_(tiny_llama(tie_word_embeddings=False), edkm.PalettizeConfig(bits=3)))
    check_against_model(tiny_llama(seed=3), steps=2)  # no LUT layer at all: the lean loop over dense Linears


def test_greedy_tokens_equal_transformers_generate():
    model = edkm.rtn_(tiny_llama(), edkm.PalettizeConfig(bits=3))
    ids = torch.tensor([[3, 14, 15, 92]])
    ref = type(model).generate(model, ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(lean_generate(model, ids, 12), ref)


def test_eos_stops_and_min_new_tokens_suppresses_it():
    model = edkm.rtn_(tiny_llama(), edkm.PalettizeConfig(bits=3))
    ids = torch.tensor([[3, 14, 15, 92]])
    free = lean_generate(model, ids, 10)
    eos = int(free[0, 6])  # the third new token as EOS: generation stops right after it
    stopped = lean_generate(model, ids, 10, eos_token_id=eos)
    assert torch.equal(stopped, free[:, : stopped.shape[1]]) and int(stopped[0, -1]) == eos
    ref = type(model).generate(model, ids, max_new_tokens=10, min_new_tokens=6, eos_token_id=eos, do_sample=False)
    assert torch.equal(lean_generate(model, ids, 10, eos_token_id=eos, min_new_tokens=6), ref)


def test_the_cache_refuses_more_tokens_than_it_holds():
    lean = LeanLlama(edkm.rtn_(tiny_llama(), edkm.PalettizeConfig(bits=3)), max_tokens=4)
    with torch.no_grad():
        lean.forward(torch.tensor([1, 2, 3]))
        with pytest.raises(ValueError, match="reach 5 tokens; this lean model caches 4"):
            lean.forward(torch.tensor([4, 5]))


def test_from_pretrained_binds_the_lean_generate(tmp_path):
    model = edkm.rtn_(tiny_llama(), edkm.PalettizeConfig(bits=3))
    path = tmp_path / "m.safetensors"
    edkm.save_palettized(model, path)
    loaded = edkm.load_palettized(path)
    assert isinstance(loaded.generate, LeanGenerate)
    ids = torch.tensor([[5, 6, 7]])
    greedy = loaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(greedy, type(loaded).generate(loaded, ids, max_new_tokens=8, do_sample=False))
    assert loaded.generate.lean is not None  # the lean path answered
    # sampling is transformers' own (same seed, same tokens)
    torch.manual_seed(0)
    sampled = loaded.generate(ids, max_new_tokens=8, do_sample=True, top_k=5)
    torch.manual_seed(0)
    assert torch.equal(sampled, type(loaded).generate(loaded, ids, max_new_tokens=8, do_sample=True, top_k=5))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=True),
        dict(num_beams=2),
        dict(repetition_penalty=1.3),
        dict(output_scores=True, return_dict_in_generate=True),
        dict(attention_mask=torch.tensor([[0, 1, 1]])),
    ],
)
def test_calls_the_lean_path_cannot_answer_fall_back(kwargs):
    model = edkm.rtn_(tiny_llama(), edkm.PalettizeConfig(bits=3))
    gen = LeanGenerate(model)
    assert gen.request((torch.tensor([[5, 6, 7]]),), {"max_new_tokens": 4, **kwargs}) is None
    assert gen.request((torch.tensor([[5, 6, 7]]),), {"max_new_tokens": 4}) is not None
    assert gen.request((torch.tensor([[5, 6, 7], [1, 2, 3]]),), {"max_new_tokens": 4}) is None  # a batch


def test_other_architectures_keep_their_generate():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32)).eval()
    assert "gpt2" in unsupported_reason(gpt2)
    assert "generate" not in bind(gpt2).__dict__
    with pytest.raises(ValueError, match="lean generation cannot run this model: model type 'gpt2'"):
        LeanLlama(gpt2, 8)
