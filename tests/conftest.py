"""Shared test fixtures."""

import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable

import pytest

# tiny models: one intra-op thread per process (child processes inherit it) unless the caller set one
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])


@pytest.fixture(scope="session")
def make_tokenizer():
    """Factory: a byte-level BPE tokenizer trained on ``corpus``, BOS added by default (like Llama's)."""

    def build(corpus: list[str], vocab_size: int):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        bpe.train_from_iterator(corpus, trainer)
        bpe.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")

    return build


@pytest.fixture(scope="session")
def tiny_causal_lm():
    """Factory: a tiny random Hugging Face causal LM of ``arch`` (llama, mistral, qwen2, phi3, gemma, gpt2, opt),
    built offline from a config (vocab 128, hidden 32, 2 layers), weights N(0, 0.3) so logits are not all ~0."""

    def build(arch: str):
        import torch
        import transformers

        small = dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        configs = {
            "llama": lambda: transformers.LlamaConfig(**small),
            "mistral": lambda: transformers.MistralConfig(**small),
            "qwen2": lambda: transformers.Qwen2Config(**small),
            "phi3": lambda: transformers.Phi3Config(**small, pad_token_id=0),
            "gemma": lambda: transformers.GemmaConfig(**small, head_dim=8),
            "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64),
            "opt": lambda: transformers.OPTConfig(
                vocab_size=128,
                hidden_size=32,
                num_hidden_layers=2,
                ffn_dim=64,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            ),
        }
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(configs[arch]())
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.3)
        return model.eval()

    return build


def _rank_child(worker: Callable[[int, int, str], dict], rank: int, world: int, init_file: str, out) -> None:
    try:
        out.put((rank, worker(rank, world, init_file)))
    except BaseException:  # report, never hang the parent
        out.put((rank, {"error": traceback.format_exc()}))


@pytest.fixture
def launch_ranks(tmp_path):
    """Run ``worker(rank, world, init_file) -> dict`` in ``world`` forked processes (real gloo, a file rendezvous at
    ``init_file``: no port); returns the results by rank, failing on a rank that raised or did not report in time."""

    def launch(worker: Callable[[int, int, str], dict], world: int, timeout: float = 90) -> list[dict]:
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_rank_child, args=(worker, r, world, str(tmp_path / "init"), out)) for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            results = dict(out.get(timeout=timeout) for _ in procs)
        except queue.Empty:
            results = {}
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
        assert len(results) == world, f"ranks {sorted(set(range(world)) - set(results))} did not report (hung?)"
        for res in results.values():
            assert "error" not in res, res["error"]
        return [results[r] for r in range(world)]

    return launch
