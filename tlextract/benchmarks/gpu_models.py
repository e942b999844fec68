"""Random-weight models at real shapes for the GPU check (:mod:`tlextract.benchmarks.gpu_check`).

The GPU machine has no network, so no weights: each model is built by transformers from a config
written here (Llama-3.2-1B, Gemma-2-2B, Qwen2.5-7B; seeded), directly on the device in the run's
dtype, and converted to a HookedTransformer with the same weights by TransformerLens' own
converter for that architecture, reading only a local ``config.json`` (never the hub). The
tokenizer is a small byte-level one built in memory and saved to disk first (an in-memory
tokenizer breaks TransformerLens); it has a pad token and no end-of-sequence token, so no
generation stops early. ``tiny=True`` keeps each architecture's features (rope scaling,
soft-capping, sliding window, QKV biases) at a few thousand parameters, for the CPU test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tlextract.model.accel import accelerate
from tlextract.model.tokens import prepare_tokenizer

# The published configs' shapes and architecture settings (config.json of each model).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_theta": 500000.0, "hidden_act": "silu",
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    },
    "gemma-2-2b": {
        "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": 2304,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_theta": 10000.0, "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "intermediate_size": 18944, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 1000000.0,
        "hidden_act": "silu", "use_sliding_window": False,
    },
}  # fmt: skip

# tiny=True: the same architectures at a few thousand parameters. Gemma's window is shorter
# than prompt + response there, so its alternating sliding window is exercised.
TINY = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 512,
    "query_pre_attn_scalar": 16, "sliding_window": 16,
}  # fmt: skip

# TransformerLens reads no Gemma 2 config from a directory, only its own by name (no network);
# tiny=True then needs the same shape overrides in TransformerLens' terms.
TL_NAMES = {"gemma-2-2b": "google/gemma-2-2b"}
TL_TINY = {
    "d_model": 64, "n_layers": 2, "n_heads": 4, "n_key_value_heads": 2, "d_head": 16,
    "d_mlp": 128, "d_vocab": 512, "d_vocab_out": 512, "window_size": 16, "rotary_dim": 16,
    "attn_types": ["local", "global"], "attn_scale": 4.0,  # sqrt(query_pre_attn_scalar)
}  # fmt: skip

# Byte-level vocabulary: specials first. No eos: generation never stops before its budget.
SPECIALS = ["<pad>"]


@dataclass
class Pair:
    """A transformers model and the HookedTransformer converted from the same weights."""

    name: str
    hf: Any  # a transformers causal LM (its generate is untyped)
    tl: HookedTransformer
    pad_id: int
    vocab: int  # token ids below this are real tokens of the tokenizer


@dataclass(frozen=True)
class Shape:
    """The published shapes, or tiny ones; ``layers`` keeps only the first blocks (real widths
    at a fraction of the memory and time)."""

    tiny: bool = False
    layers: int | None = None

    def tl_overrides(self, name: str) -> dict[str, Any]:
        """For a model TransformerLens configures by name (it reads no config.json then)."""
        if name not in TL_NAMES:
            return {}
        out = dict(TL_TINY) if self.tiny else {}
        if self.layers:
            out.update(
                n_layers=self.layers, attn_types=(["local", "global"] * self.layers)[: self.layers]
            )
        return out


def hf_config(name: str, shape: Shape) -> Any:
    spec = dict(CONFIGS[name])
    if shape.tiny:
        spec.update({k: v for k, v in TINY.items() if k in spec or k == "head_dim"})
    if shape.layers:
        spec["num_hidden_layers"] = shape.layers
    # No special ids: transformers would stop at (or, with min_new_tokens, suppress) them.
    spec.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def build_pair(
    name: str, device: str, dtype: torch.dtype, shape: Shape, seed: int, work: Path
) -> Pair:
    """Both models of ``name`` on ``device`` in ``dtype``, weights drawn from ``seed``."""
    config = hf_config(name, shape)
    directory = work / f"model-{list(CONFIGS).index(name)}"
    # TransformerLens picks an architecture from these words in a name before reading config.json.
    if any(word in str(directory).lower() for word in ("llama", "gemma")):
        raise ValueError(f"{directory}: the work directory must not contain 'llama' or 'gemma'")
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)  # config.json only: TransformerLens reads it
    tokenizer = _tokenizer(directory)
    torch.manual_seed(seed)
    with torch.device(device):
        # eager: transformers' only attention with Gemma 2's logit soft-capping
        attn = "eager" if config.model_type == "gemma2" else None
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    hf.eval()
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    tl_name = TL_NAMES.get(name, str(directory))
    model = hooked(hf, tokenizer, tl_name, device, dtype, shape.tl_overrides(name))
    return Pair(name, hf, model, tokenizer.pad_token_id, len(tokenizer))


def hooked(
    hf: PreTrainedModel,
    tokenizer: Any,
    tl_name: str,
    device: str,
    dtype: torch.dtype,
    overrides: dict[str, Any],
) -> HookedTransformer:
    """``hf`` as an accelerated HookedTransformer, converted as ``load_model`` converts a model
    (TransformerLens' config of ``tl_name``, a directory or an official name, with
    ``overrides``), built on the device (no host copy of the weights)."""
    cfg = tl_loading.get_pretrained_model_config(
        tl_name,
        hf_cfg=hf.config.to_dict(),
        device=device,
        dtype=dtype,
        default_prepend_bos=False,
        local_files_only=True,
    )
    if overrides:
        cfg = HookedTransformerConfig(**{**cfg.to_dict(), **overrides})
    state_dict = tl_loading.get_pretrained_state_dict(tl_name, cfg, hf, dtype=dtype)
    cfg.tokenizer_name = None  # ours is attached below; TransformerLens would fetch one
    with torch.device(device):
        model = HookedTransformer(cfg, move_to_device=False)
    model.load_state_dict(model.fill_missing_keys(state_dict), strict=True)
    del state_dict
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = False
    return accelerate(model)


def _tokenizer(directory: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(SPECIALS + alphabet)}, merges=[])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>").save_pretrained(directory)
    # Loaded back from disk: an in-memory tokenizer breaks TransformerLens.
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    prepare_tokenizer(tokenizer)
    return tokenizer
