"""edkm.eval: perplexity and zero-shot scoring against brute-force computations on tiny models."""

from __future__ import annotations

import bz2
import json
import math
from pathlib import Path

import pytest
import torch

import edkm
from edkm.eval import evaluate_task, evaluate_tasks, load_task, loglikelihoods, perplexity
from edkm.eval import zeroshot as zs

ASSETS = Path(edkm.__file__).parent / "assets"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared beside the checkout
BUNDLED_SIZES = {"piqa": {2}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "winogrande": {2}, "hellaswag": {4}}


@pytest.fixture(scope="module")
def tok(make_tokenizer):
    """A byte-level BPE tokenizer (BOS added by default, like Llama's) trained on the bundled items."""
    return make_tokenizer([d.context + " " + " ".join(d.choices) for t in zs.TASKS for d in load_task(t)], 1000)


def tiny_llama(vocab_size: int, max_positions: int = 1024, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so that choices score differently
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


# ------------------------------------------------------------------------------ perplexity
def brute_force_ppl(model, tokens: torch.Tensor, context: int) -> float:
    """Token t (t >= 1) is predicted from tokens[k*context : t], k = (t - 1) // context, one forward each."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, tokens.numel()):
            start = (t - 1) // context * context
            logits = model(tokens[start:t].unsqueeze(0)).logits[0, -1].double()
            total -= torch.log_softmax(logits, -1)[tokens[t]].item()
    return math.exp(total / (tokens.numel() - 1))


@pytest.mark.parametrize("n, context, batch_size", [(50, 16, 2), (33, 16, 8), (20, 64, 3), (2, 8, 1)])
def test_perplexity_equals_brute_force(model, n, context, batch_size):
    tokens = torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
    got = perplexity(model, tokens, context=context, batch_size=batch_size)
    assert got == pytest.approx(brute_force_ppl(model, tokens, context), rel=1e-6)


def test_perplexity_batches_at_most_batch_tokens_and_scores_the_same(model):
    tokens = torch.randint(0, model.config.vocab_size, (129,), generator=torch.Generator().manual_seed(1))
    seen = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].numel()))
    try:
        capped = perplexity(model, tokens, context=16, batch_size=8, batch_tokens=32)
    finally:
        handle.remove()
    assert max(seen) == 32 and len(seen) == 4  # 8 windows of 16 tokens, 2 per forward
    assert capped == pytest.approx(perplexity(model, tokens, context=16, batch_size=8), rel=1e-9)


def test_perplexity_uniform_model_is_vocab_size():
    model = tiny_llama(257)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: uniform over the vocabulary
    tokens = torch.randint(0, 257, (100,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, tokens, context=32) == pytest.approx(257.0, rel=1e-6)  # log-softmax in float32


def test_perplexity_restores_train_state(model):
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    perplexity(model, torch.arange(20), context=8)
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training
    model.eval()


def test_perplexity_errors(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 1024"):
        perplexity(model, torch.arange(50), context=2048)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.arange(50).reshape(5, 10))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, torch.arange(1))


# ------------------------------------------------------------------------------ task files
@pytest.mark.parametrize("task", list(BUNDLED_SIZES))
def test_bundled_subsets_parse(task):
    docs = load_task(task)
    assert len(docs) == 50
    for d in docs:
        assert len(d.choices) in BUNDLED_SIZES[task] and 0 <= d.label < len(d.choices)
        assert len(zs.task_requests(task, d)) == len(d.choices)
    if task == "winogrande":
        assert all("_" in d.context for d in docs)
    assert len(load_task(task, limit=7)) == 7


def test_prompt_formats():
    piqa = load_task("piqa")[0]
    assert zs.task_requests("piqa", piqa)[0] == (f"Question: {piqa.context}\nAnswer:", " " + piqa.choices[0])
    arc = load_task("arc_easy")[0]
    assert zs.task_requests("arc_easy", arc)[3] == (f"Question: {arc.context}\nAnswer:", " " + arc.choices[3])
    wino = zs.MCDoc("Sarah was better than Maria so _ got the easier cases.", ("Sarah", "Maria"), 1)
    assert zs.task_requests("winogrande", wino) == [
        ("Sarah was better than Maria so Sarah", " got the easier cases."),
        ("Sarah was better than Maria so Maria", " got the easier cases."),
    ]
    hs = zs.MCDoc("Roof shingle removal: A man is sitting on a roof. he", ("is [x] using  wrap.", "b", "c", "d"), 3)
    assert zs.task_requests("hellaswag", hs)[0] == (
        "Roof shingle removal: A man is sitting on a roof. He",
        " is using wrap.",
    )
    wikihow = zs.MCDoc("Health: How to rest. Sleep well. Eat well.", ("a", "b", "c", "d"), 0)
    assert zs.task_requests("hellaswag", wikihow)[0][0] == "Health: How to rest. Sleep well. Eat well."


def _adapters_record(instruction: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def test_llm_adapters_and_llamacpp_readers(tmp_path):
    (tmp_path / "commonsense_eval" / "ARC-Easy").mkdir(parents=True)
    arc = _adapters_record(
        "Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice Answer2: steam "
        "Answer3: rock Answer4: wood Answer5: sand\n\nAnswer format: answer1/answer2/answer3/answer4/answer5",
        "answer2",
    )
    (tmp_path / "commonsense_eval" / "ARC-Easy" / "test.json").write_text(json.dumps([arc]))
    (tmp_path / "piqa").mkdir()
    piqa = _adapters_record(
        "Please choose the correct solution to the question: dresser\n\nSolution1: replace drawer \n\n"
        "Solution2: finish, woodgrain\n\nAnswer format: solution1/solution2",
        "solution2",
    )
    (tmp_path / "piqa" / "test.json").write_text(json.dumps([piqa]))
    (tmp_path / "winogrande").mkdir()
    wino = _adapters_record(
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        "Sarah beat Maria so _ won."
        "\n\nOption1: Sarah Option2: Maria Answer format: option1/option2",
        "option1",
    )
    (tmp_path / "winogrande" / "test.json").write_text(json.dumps([wino, {**wino, "answer": "option3"}]))
    lines = ["Clean and jerk: A lady walks. the lady", "3", "a.", "b.", "c.", "d."] * 2
    (tmp_path / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))

    assert load_task("arc_easy", tmp_path) == [zs.MCDoc("Which is a gas?", ("ice", "steam", "rock", "wood", "sand"), 1)]
    assert load_task("piqa", tmp_path) == [zs.MCDoc("dresser", ("replace drawer ", "finish, woodgrain"), 1)]
    assert load_task("hellaswag", tmp_path, limit=1) == [zs.MCDoc(lines[0], ("a.", "b.", "c.", "d."), 3)]
    with pytest.raises(ValueError, match="item 1: bad answer 'option3'"):
        load_task("winogrande", tmp_path)
    with pytest.raises(FileNotFoundError, match="arc_challenge"):
        load_task("arc_challenge", tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mmlu")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data not available")
def test_full_shared_files_parse():
    sizes = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267, "hellaswag": 10042}
    for task, n in sizes.items():
        docs = load_task(task, SHARED)
        assert len(docs) == n
        assert docs[:50] == load_task(task)  # the bundled subsets are the first 50 items


# ------------------------------------------------------------------------------- scoring
def brute_force_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """One unpadded forward pass per choice over tok.encode(context + continuation)."""
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[j - 1, whole[j]].item() for j in range(n_ctx, len(whole)))


def test_encode_pair_follows_lm_eval(tok):
    ctx, cont = zs.encode_pair(tok, "Question: Why?\nAnswer: ", "Because")
    assert ctx == tok.encode("Question: Why?\nAnswer:") and ctx[0] == tok.bos_token_id
    assert ctx + cont == tok.encode("Question: Why?\nAnswer: Because")  # the trailing space moved over
    assert zs.encode_pair(tok, "", " the")[0] == [tok.bos_token_id]
    assert zs.encode_pair(tok, "a b", " c", add_bos=False)[0] == tok.encode("a b", add_special_tokens=False)


def test_loglikelihoods_equal_brute_force(model, tok):
    requests = [r for t in BUNDLED_SIZES for d in load_task(t, limit=3) for r in zs.task_requests(t, d)]
    got = loglikelihoods(model, tok, requests, batch_size=5)
    want = [brute_force_loglikelihood(model, tok, c, x) for c, x in requests]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_loglikelihoods_truncate_from_left(tok):
    short = tiny_llama(len(tok), max_positions=16)
    ctx, cont = "Question: " + "why is the sky blue and the grass green " * 4 + "\nAnswer:", " Because"
    c, x = zs.encode_pair(tok, ctx, cont)
    window = (c + x)[-17:]
    with torch.no_grad():
        logp = torch.log_softmax(short(torch.tensor([window[:-1]])).logits[0].double(), -1)
    want = sum(logp[j - 1, window[j]].item() for j in range(len(window) - len(x), len(window)))
    assert loglikelihoods(short, tok, [(ctx, cont)])[0] == pytest.approx(want, rel=1e-5)


def test_accuracy_from_scores(model, tok):
    for task in ("piqa", "winogrande", "hellaswag"):
        docs = load_task(task, limit=10)
        res = evaluate_task(model, tok, task, limit=10, batch_size=7)
        acc = acc_norm = acc_bytes = 0
        for d in docs:
            reqs = zs.task_requests(task, d)
            s = [brute_force_loglikelihood(model, tok, c, x) for c, x in reqs]
            acc += max(range(len(s)), key=s.__getitem__) == d.label
            chars = [len(x) - 1 for _, x in reqs]  # choice text without its leading space
            nbytes = [len(x.encode()) - 1 for _, x in reqs]
            acc_norm += max(range(len(s)), key=lambda j: s[j] / chars[j]) == d.label
            acc_bytes += max(range(len(s)), key=lambda j: s[j] / nbytes[j]) == d.label
        assert res["n"] == 10 and res["acc"] == pytest.approx(acc / 10)
        if task == "winogrande":
            assert res["acc_norm"] is None and res["acc_bytes"] is None  # lm-eval reports acc only
        else:
            assert res["acc_norm"] == pytest.approx(acc_norm / 10)
            assert res["acc_bytes"] == pytest.approx(acc_bytes / 10)


real_model = pytest.mark.skipif(
    not (ASSETS / "stories260K" / "config.json").is_file(), reason="bundled stories260K model not converted yet"
)


@pytest.fixture(scope="module")
def stories():
    from edkm.models import load_causal_lm

    return load_causal_lm(None)


@real_model
def test_real_model_on_bundled_subsets(stories):
    model, tok = stories
    results = evaluate_tasks(model, tok, list(BUNDLED_SIZES), limit=4)
    assert set(results) == set(BUNDLED_SIZES)
    for task, r in results.items():
        assert r["n"] == 4 and 0.0 <= r["acc"] <= 1.0, task
        assert (r["acc_norm"] is None) == (r["acc_bytes"] is None) == (task == "winogrande")


@real_model
def test_real_model_heldout_perplexity(stories):
    from edkm.data.text import load_text
    from edkm.eval import heldout_tokens
    from edkm.models import BUNDLED_TEXT

    model, tok = stories
    tokens = heldout_tokens(tok, load_text(BUNDLED_TEXT))
    assert tokens[0] == tok.bos_token_id
    ppl = perplexity(model, tokens[:2048], context=256)
    assert 2.0 < ppl < 12.0  # in-domain: full held-out split gives 5.53 at context 256; uniform would be 512


@real_model
@pytest.mark.slow
def test_real_model_full_bundled_subsets(stories):
    model, tok = stories
    results = evaluate_tasks(model, tok, list(BUNDLED_SIZES))
    for task, r in results.items():
        assert r["n"] == 50 and 0.0 <= r["acc"] <= 1.0, task


@real_model
def test_our_scorer_agrees_with_lm_eval_itself_on_every_field_task(stories):
    """lm-eval 0.4's HFLM and metrics, from task YAMLs over our JSONL (edkm.eval.lmeval_check), score the bundled
    model's first items of the five field tasks with the same acc / acc_norm and log-likelihoods within 1e-4."""
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra 'lmeval' (scripts/setup.sh installs it)")
    from edkm.eval.lmeval_check import CHECKED, crosscheck

    model, tok = stories
    result = crosscheck(model, tok, CHECKED, limit=8)
    assert set(result) == set(CHECKED)
    for task, r in result.items():
        assert r["same_requests"] and r["ours"]["n"] == r["lm_eval"]["n"] == 8, task
        assert r["max_abs_ll_diff"] < 1e-4 and r["items_differing"] == 0, (task, r)
        assert r["ours"]["acc"] == r["lm_eval"]["acc"] and r["ours"]["acc_norm"] == r["lm_eval"]["acc_norm"], task
