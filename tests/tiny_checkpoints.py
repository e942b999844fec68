"""Tiny random-weight Hugging Face checkpoints (2 layers, hidden 64) of the architectures tlextract
loads from a directory, written in a fraction of a second with no download: a transformers
config, seeded weights and the tiny-random byte-level tokenizer (vocab 259, chat template).

The weights are larger than transformers' initialization (std 0.3), so greedy tokens vary from
step to step instead of repeating one token, and each architecture's peculiarity is switched on:
Llama 3's scaled RoPE, Qwen2's attention biases, Gemma's sliding window (4 tokens, shorter than
the test prompts) and Gemma 2's soft caps, a few experts in the MoE.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tlextract.model.load import model_directory

SEED = 0
WEIGHT_STD = 0.3
NORM_STD = 0.1  # norm weights: their default (1, or 0 where Gemma adds 1) plus this noise
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# The tiny-random tokenizer's special tokens.
PAD, BOS, EOS = 0, 1, 2

LLAMA_LIKE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])

# model_type and config of each architecture, by the key the tests use.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3": (
        "llama",
        LLAMA_LIKE
        | dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "gemma2": (
        "gemma2",
        LLAMA_LIKE
        | SLIDING
        | dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=16),
    ),
    "gemma3": ("gemma3_text", LLAMA_LIKE | SLIDING | dict(query_pre_attn_scalar=16)),
    "qwen2": ("qwen2", LLAMA_LIKE | dict(num_key_value_heads=1)),
    "qwen3": ("qwen3", LLAMA_LIKE),
    "mistral": ("mistral", LLAMA_LIKE),
    "phi3": ("phi3", LLAMA_LIKE | dict(original_max_position_embeddings=256)),
    "olmo2": ("olmo2", LLAMA_LIKE),
    "qwen3_moe": (
        "qwen3_moe",
        LLAMA_LIKE
        | dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    ),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
}
ARCHITECTURES = tuple(CONFIGS)


def save_checkpoint(arch: str, directory: Path, **overrides: Any) -> Path:
    """Write ``arch``'s tiny checkpoint (config.json, model.safetensors, tokenizer) into
    ``directory`` (created) and return it; ``overrides``: config fields to change (sizes)."""
    model_type, kwargs = CONFIGS[arch]
    config = AutoConfig.for_model(
        model_type, vocab_size=259, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        **(kwargs | overrides),
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if _is_norm(name):
                    p.add_(torch.randn_like(p) * NORM_STD)
                else:
                    p.copy_(torch.randn_like(p) * WEIGHT_STD)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer = model_directory("tiny-random")
    for file in TOKENIZER_FILES:
        shutil.copy(tokenizer / file, directory / file)
    return directory


def _is_norm(name: str) -> bool:
    """A normalization's weight or bias (GPT-2's are ``ln_1``, ``ln_2``, ``ln_f``)."""
    return "norm" in name or ".ln_" in name
