"""What a model name is, decided in one place: :func:`resolve_model` returns a :class:`ModelSource`
saying where the model's Hugging Face files are and how TransformerLens builds it from them.

A name is, in this order (the first that fits):

* ``embedded``: an embedded model (``smollm2-135m-instruct``, ``gemma-3-270m``, ``tiny-random``;
  case-insensitive), built into the local cache on first use (:mod:`tlextract.model.cache`);
* ``local``: the path of a local directory holding a Hugging Face model;
* ``hub``: a TransformerLens model name or alias, or a Hugging Face id ``org/name`` of an
  architecture TransformerLens builds from a config, downloaded or read from the Hugging Face
  cache (:mod:`tlextract.model.hub`).

Anything else is refused with one line listing what a name may be.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformer_lens import HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import PreTrainedModel

from tlextract.errors import TLExtractError
from tlextract.model import hub
from tlextract.model.cache import EMBEDDED_MODELS, TINY_MODEL, embedded, ensure_cached

SourceKind = Literal["embedded", "local", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """A model name resolved: where its Hugging Face files are and how to convert them."""

    kind: SourceKind
    # The name in messages and in a loaded model's cfg.model_name (embedded names lower-cased).
    label: str
    # The Hugging Face model directory; None when resolved with fetch_weights=False.
    directory: Path | None
    # TransformerLens name (or directory) whose config and weight converter apply; None: llama
    # through our own config (TransformerLens has no entry for SmolLM2-like models).
    tl_name: str | None
    # None keeps TransformerLens' default (True).
    default_prepend_bos: bool | None

    def converted(
        self, hf_model: PreTrainedModel, device: str, dtype: torch.dtype
    ) -> tuple[HookedTransformerConfig, dict[str, torch.Tensor]]:
        """TransformerLens' config and state dict of ``hf_model``, the model in
        :attr:`directory`; the tensors are mostly views of its weights (what the converters
        return)."""
        if self.tl_name is None:
            cfg = _llama_config(hf_model.config, device, dtype, self.default_prepend_bos)
            return cfg, convert_llama_weights(hf_model, cfg)
        # What from_pretrained_no_processing does, minus its alias lookup that rejects directories.
        cfg = tl_loading.get_pretrained_model_config(
            self.tl_name,
            hf_cfg=hf_model.config.to_dict(),
            device=device,
            dtype=dtype,
            default_prepend_bos=self.default_prepend_bos,
            local_files_only=True,
        )
        return cfg, tl_loading.get_pretrained_state_dict(self.tl_name, cfg, hf_model, dtype=dtype)


def resolve_model(name: str, *, fetch_weights: bool = True) -> ModelSource:
    """What ``name`` is (see the module's docstring), in one pass.

    ``fetch_weights`` (default): the model's files are made available: an embedded model built
    into its cache if missing or damaged, a hub model downloaded (offline: read from the Hugging
    Face cache), and a directory's or unlisted hub id's architecture checked (an unsupported one
    fails before its weights are downloaded). ``fetch_weights=False`` decides from the name
    alone, building, downloading and reading nothing: ``directory`` is None and ``tl_name`` is
    known only for embedded and TransformerLens names. Raises TLExtractError (one line) for a
    name that cannot be a model, and, fetching, for a model that is not available.
    """
    key = name.lower()
    spec = embedded(key)
    if spec is not None:
        directory = ensure_cached(key, spec) if fetch_weights else None
        return ModelSource("embedded", key, directory, spec.tl_name, spec.default_prepend_bos)
    path = Path(name).expanduser()
    if path.is_dir():
        if not fetch_weights:
            return ModelSource("local", name, None, None, None)
        return ModelSource("local", name, path, _converter(path, str(path)), None)
    official = _official(name)
    if official is not None:
        directory = hub.fetch(official) if fetch_weights else None
        return ModelSource("hub", name, directory, official, None)
    if not hub.is_repo_id(name):
        raise _unknown(name)
    if not fetch_weights:
        return ModelSource("hub", name, None, None, None)
    _converter(hub.fetch_config(name), name)  # an unsupported architecture fails before the weights
    directory = hub.fetch(name)
    return ModelSource("hub", name, directory, _converter(directory, name), None)


def _official(name: str) -> str | None:
    try:
        return tl_loading.get_official_model_name(name)
    except ValueError:  # its message lists every official name: not chained to ours
        return None


def _unknown(name: str) -> TLExtractError:
    return TLExtractError(
        f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}; "
        f"{TINY_MODEL} for tests), not a TransformerLens model name, not a Hugging Face id "
        "org/name and not a directory. Pass an embedded name, a TransformerLens model name "
        "such as google/gemma-2-2b-it, a Hugging Face id of an architecture TransformerLens "
        "supports, or a directory holding a Hugging Face model."
    )


def _converter(directory: Path, label: str) -> str | None:
    """The ``tl_name`` of a Hugging Face model directory that is not a TransformerLens model
    name: None (our converter) for llama, else the directory itself for TransformerLens' config
    of it; an architecture TransformerLens has no config for is refused here."""
    if not (directory / "config.json").is_file():
        raise TLExtractError(f"{label} holds no config.json: it is not a Hugging Face model")
    config = json.loads((directory / "config.json").read_text())
    arch = (config.get("architectures") or ["(none in config.json)"])[0]
    if arch == "LlamaForCausalLM":
        return None
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
    return tl_name


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


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
