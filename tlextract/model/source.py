"""What a model name is, decided in one place: :func:`resolve_model` returns a :class:`ModelSource`
saying where the model's Hugging Face files are and how TransformerLens builds it from them.

A name is, in this order (the first that fits):

* ``embedded``: an embedded model (``smollm2-135m-instruct``, ``gemma-3-270m``, ``tiny-random``;
  case-insensitive), built into the local cache on first use (:mod:`tlextract.model.cache`);
* ``local``: the path of a local directory holding a Hugging Face model;
* ``hub``: a TransformerLens model name or alias, or a Hugging Face id ``org/name`` of an
  architecture TransformerLens builds from a config, downloaded or read from the Hugging Face
  cache (:mod:`tlextract.model.hub`).

Anything else is refused with one line listing what a name may be. A local directory may also
hold a LoRA adapter (``adapter_config.json`` naming its base model): it resolves to its base,
with :attr:`ModelSource.adapter` set, and is merged into it on load (``peft`` needed).

The backend that builds the model is decided here too (:func:`resolve_model`'s ``backend``):
``hooked``, TransformerLens' HookedTransformer (accelerated by tlextract), or ``bridge``,
TransformerLens' TransformerBridge around the transformers model (:mod:`tlextract.model.bridge`).
``auto`` keeps HookedTransformer wherever it loaded models before the bridge existed (embedded
models, TransformerLens model names, and directories or hub ids of architectures TransformerLens
converts, except llama with scaled RoPE or biases and :data:`HOOKED_MISFITS`) and takes the
bridge for every other architecture the bridge supports; anything else is one line naming the
architecture.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from transformer_lens import HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import PreTrainedModel

from tlextract.config import MODEL_BACKENDS as BACKENDS
from tlextract.errors import TLExtractError, first_line
from tlextract.model import hub
from tlextract.model.cache import EMBEDDED_MODELS, TINY_MODEL, embedded, ensure_cached

SourceKind = Literal["embedded", "local", "hub"]
Backend = Literal["hooked", "bridge"]

# Architectures TransformerLens converts from a directory into a HookedTransformer whose state
# dict then does not fit (load_state_dict fails): auto takes the bridge for them.
HOOKED_MISFITS = frozenset({"Phi3ForCausalLM"})
ASKED = "backend='bridge' was asked for"  # the reason logged when the caller chose the bridge


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
    backend: Backend = "hooked"
    # Why this backend, said once when the model loads ("" for the HookedTransformer default).
    reason: str = ""
    # A LoRA adapter directory to merge into the model at ``directory``.
    adapter: Path | None = None

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


def resolve_model(name: str, *, fetch_weights: bool = True, backend: str = "auto") -> ModelSource:
    """What ``name`` is (see the module's docstring), in one pass.

    ``fetch_weights`` (default): the model's files are made available: an embedded model built
    into its cache if missing or damaged, a hub model downloaded (offline: read from the Hugging
    Face cache), and a directory's or unlisted hub id's architecture checked (an unsupported one
    fails before its weights are downloaded). ``fetch_weights=False`` decides from the name
    alone, building, downloading and reading nothing: ``directory`` is None and ``tl_name`` is
    known only for embedded and TransformerLens names; a directory's backend is then not
    decided (``hooked`` stands in for ``auto``). Raises TLExtractError (one line) for a name
    that cannot be a model or a backend that cannot build it, and, fetching, for a model that
    is not available.
    """
    if backend not in BACKENDS:
        raise TLExtractError(
            f"backend={backend!r} is not a backend; use one of {', '.join(BACKENDS)}",
            parameters=("backend",),
        )
    key = name.lower()
    spec = embedded(key)
    if spec is not None:
        directory = ensure_cached(key, spec) if fetch_weights else None
        source = ModelSource("embedded", key, directory, spec.tl_name, spec.default_prepend_bos)
        return _asked_for_bridge(source) if backend == "bridge" else source
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
            return _adapter(path, name, fetch_weights, backend)
        if not fetch_weights:
            return ModelSource("local", name, None, None, None)
        return _decided(ModelSource("local", name, path, None, None), path, backend)
    official = _official(name)
    if official is not None:
        directory = hub.fetch(official) if fetch_weights else None
        source = ModelSource("hub", name, directory, official, None)
        return _asked_for_bridge(source) if backend == "bridge" else source
    if not hub.is_repo_id(name):
        raise _unknown(name)
    if not fetch_weights:
        return ModelSource("hub", name, None, None, None)
    # An unsupported architecture fails before the weights are downloaded.
    _decided(ModelSource("hub", name, None, None, None), hub.fetch_config(name), backend)
    directory = hub.fetch(name)
    return _decided(ModelSource("hub", name, directory, None, None), directory, backend)


ADAPTER_CONFIG = "adapter_config.json"


def _adapter(path: Path, name: str, fetch_weights: bool, backend: str) -> ModelSource:
    """A LoRA adapter directory: its base model resolved, with the adapter to merge into it."""
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TLExtractError(
            f"{name}: {ADAPTER_CONFIG} names no base_model_name_or_path ({e}); it is not a LoRA "
            "adapter directory peft can load"
        ) from e
    if importlib.util.find_spec("peft") is None:
        raise TLExtractError(
            f"{name} is a LoRA adapter directory: merging it needs peft; install it with "
            "pip install 'tlextract[lora]'"
        )
    source = resolve_model(str(base), fetch_weights=fetch_weights, backend=backend)
    return replace(source, kind="local", label=name, adapter=path)


def _decided(source: ModelSource, directory: Path, backend: str) -> ModelSource:
    """``source`` (a directory or hub id) with its backend and converter decided from the
    architecture in ``directory``'s config.json."""
    config = _config(directory, source.label)
    arch = (config.get("architectures") or ["(none in config.json)"])[0]
    refusal = None
    if backend != "bridge":
        tl_name, refusal = _hooked_build(directory, source.label, arch, config)
        if refusal is None:
            return replace(source, tl_name=tl_name)
        if backend == "hooked":
            raise TLExtractError(
                f'{source.label}: {refusal}; load it with backend="bridge"', parameters=("backend",)
            )
    if arch not in bridge_architectures():
        raise TLExtractError(
            f"{source.label}: architecture {arch} can be loaded neither by HookedTransformer nor "
            f"by TransformerLens {_tl_version()}'s TransformerBridge; supported: "
            f"{', '.join(a.removesuffix('ForCausalLM') for a in bridge_architectures())}"
        )
    return replace(source, backend="bridge", reason=refusal or ASKED)


def _asked_for_bridge(source: ModelSource) -> ModelSource:
    return replace(source, backend="bridge", tl_name=None, reason=ASKED)


def _hooked_build(
    directory: Path, label: str, arch: str, config: dict[str, Any]
) -> tuple[str | None, str | None]:
    """How HookedTransformer builds this directory's model: ``(tl_name, None)``, its
    converter (None: ours, for llama); or ``(None, why it cannot)``."""
    if arch in HOOKED_MISFITS:
        return None, f"HookedTransformer's conversion of {arch} does not fit its weights"
    if arch == "LlamaForCausalLM":
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if (
            rope.get("rope_type", rope.get("type", "default")) != "default"
            or config.get("attention_bias")
            or config.get("mlp_bias")
        ):
            return None, "HookedTransformer's llama conversion has no scaled RoPE or biases"
        return None, None
    tl_name = str(directory.resolve())
    try:
        tl_loading.convert_hf_model_config(tl_name, local_files_only=True)
    # AttributeError: TransformerLens guessed llama or gemma from the path and read no config.
    except (NotImplementedError, AttributeError, ValueError) as e:
        why = first_line(e)
        return None, f"TransformerLens {_tl_version()} has no HookedTransformer for {arch} ({why})"
    return tl_name, None


def bridge_architectures() -> list[str]:
    """The text-generating architectures TransformerBridge has adapters for."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return sorted(a for a in SUPPORTED_ARCHITECTURES if a.endswith(("ForCausalLM", "LMHeadModel")))


def backend_of(name: str, backend: str = "auto") -> Backend:
    """The backend ``load_model(name, backend=backend)`` builds, decided from config.json alone
    (an unlisted hub id's is fetched: a few kB), loading and downloading no weights."""
    source = resolve_model(name, fetch_weights=False, backend=backend)
    if backend != "auto":
        return "bridge" if backend == "bridge" else "hooked"
    if source.kind == "embedded" or source.tl_name is not None:
        return "hooked"
    if source.adapter is not None:  # resolved to its base, whose backend it shares
        base = json.loads((source.adapter / ADAPTER_CONFIG).read_text())
        return backend_of(str(base["base_model_name_or_path"]))
    directory = Path(name).expanduser() if source.kind == "local" else hub.fetch_config(name)
    config = _config(directory, source.label)
    arch = (config.get("architectures") or [""])[0]
    return "hooked" if _hooked_build(directory, name, arch, config)[1] is None else "bridge"


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


def _config(directory: Path, label: str) -> dict[str, Any]:
    if not (directory / "config.json").is_file():
        raise TLExtractError(f"{label} holds no config.json: it is not a Hugging Face model")
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise TLExtractError(f"{label}: its config.json is not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise TLExtractError(f"{label}: its config.json is not a JSON object")
    return config


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
    # _hooked_build refused scaled RoPE and biases, which convert_llama_weights would drop.
    rope = getattr(hf_config, "rope_parameters", None) or {}
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
