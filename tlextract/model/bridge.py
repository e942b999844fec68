"""Models HookedTransformer cannot load, through TransformerLens' ``TransformerBridge``.

The bridge wraps the transformers model itself (157 architecture adapters in TransformerLens 3.9)
and gives it the same hook names (``blocks.{l}.hook_resid_pre/mid/post``), ``hooks()`` and
``run_with_cache``; its weights are transformers' own, so its residuals are transformers'
``hidden_states``. It is never accelerated: its forward pass is transformers'.

One repair is needed: from transformers 5.24 on, decoder layers hand their KV cache to attention as
``cache=``, while the bridge's attention reads only ``past_key_values`` (and ``layer_past``), so
the cache never fills and every decode step attends to itself alone: generation is silently wrong.
:func:`install_cache_shim` passes ``cache`` on under the name the bridge reads. It is tested
against transformers' ``generate`` on every run of the suite (tests/test_local_models.py).
"""

from __future__ import annotations

import gc
import logging
from functools import wraps
from typing import Any, cast

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tlextract.errors import TLExtractError, first_line

_SHIM = "_tlx_cache_shim"


def install_cache_shim() -> None:
    """Make the bridge's attention read the KV cache transformers >= 5.24 passes as ``cache``.
    Idempotent; on older transformers (which pass ``past_key_values``) it changes nothing."""
    original = AttentionBridge._update_kv_cache
    if getattr(original, _SHIM, False):
        return

    @wraps(original)
    def update(self: AttentionBridge, k: Any, v: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return original(self, k, v, **kwargs)

    setattr(update, _SHIM, True)
    AttentionBridge._update_kv_cache = update  # type: ignore[method-assign]


def load_bridge(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    label: str,
    device: str,
    dtype: torch.dtype,
) -> TransformerBridge:
    """A TransformerBridge around ``hf_model`` (already in ``dtype``; moved to ``device``), with
    ``tokenizer`` (left padding, a pad token) attached and ``cfg.model_name = label``. Raises
    TLExtractError, naming the architecture, for one the bridge has no adapter for."""
    install_cache_shim()
    arch = (getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])[0]
    quiet = logging.getLogger("transformer_lens")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on eager attention and missing aliases: noise here
    cast(torch.nn.Module, hf_model).to(device)  # in place: a module's .to returns itself
    try:
        bridge = TransformerBridge.boot_transformers(
            label, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    except (ValueError, NotImplementedError, KeyError) as e:
        raise TLExtractError(
            f"{label}: architecture {arch} is supported neither by HookedTransformer nor by "
            f"TransformerLens' TransformerBridge ({first_line(e)}); see docs/models.md for the "
            "architectures tlextract loads"
        ) from e
    finally:
        quiet.setLevel(level)
        gc.collect()
    bridge.eval().requires_grad_(False)
    bridge.tokenizer = tokenizer  # the bridge's setter may have replaced ours: keep left padding
    bridge.cfg.model_name = label
    # tlextract tokenizes with the tokenizer itself; TransformerLens' own to_tokens should not
    # add a second BOS to chat text that already starts with one.
    bridge.cfg.default_prepend_bos = False
    return bridge
