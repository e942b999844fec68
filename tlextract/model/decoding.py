"""A forward pass with a KV cache on either backend: the one place that knows how a
HookedTransformer and a TransformerBridge differ there.

A HookedTransformer keeps its own ``TransformerLensKeyValueCache`` (which remembers the attention
mask of what it holds) and stops at a block on request. A TransformerBridge runs the transformers
model, whose cache (a ``DynamicCache``) holds keys and values only: :class:`BridgeCache` adds the
mask, and each pass gets the whole mask and positions counted from it, as transformers'
``generate`` gives them, so a left-padded row sits where it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache, PretrainedConfig

# What tlextract loads (tlextract.load_model): either backend, the same hook names.
Model = HookedTransformer | TransformerBridge


@dataclass
class BridgeCache:
    """A transformers cache and the attention mask of the tokens it holds."""

    hf: DynamicCache
    mask: Int[Tensor, "batch pos"]


KVCache = TransformerLensKeyValueCache | BridgeCache


def empty_cache(model: Model, batch: int, device: str | torch.device) -> KVCache:
    if isinstance(model, TransformerBridge):
        config = cast(PretrainedConfig, model.original_model.config)
        return BridgeCache(
            DynamicCache(config=config), torch.zeros(batch, 0, dtype=torch.long, device=device)
        )
    return TransformerLensKeyValueCache.init_cache(model.cfg, device, batch)


def keep_rows(cache: KVCache, keep: Int[Tensor, " kept"]) -> None:
    """Keep only the rows ``keep`` of the cache (finished rows leave the batch)."""
    if isinstance(cache, BridgeCache):
        cache.hf.batch_select_indices(keep)
        cache.mask = cache.mask[keep]
        return
    for entry in cache.entries:
        entry.past_keys = entry.past_keys[keep]
        entry.past_values = entry.past_values[keep]
    cache.previous_attention_mask = cache.previous_attention_mask[keep]


def bridge_pass(
    model: TransformerBridge,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    cache: BridgeCache | None,
    *,
    last_logits: bool = False,
    stop_at_layer: int | None = None,
) -> Float[Tensor, "batch 1 vocab"] | None:
    """One pass of the transformers model under the bridge's hooks, appending to ``cache``;
    the logits at the last position only when ``last_logits`` (unembedding every prompt
    position is wasted work), else none (``stop_at_layer``: the blocks before it only)."""
    full = mask if cache is None else torch.cat([cache.mask, mask], dim=1)
    positions = mask_positions(full)[:, -tokens.shape[1] :]
    extra: dict[str, object] = {"use_cache": False}  # a teacher-forced pass keeps no cache
    if cache is not None:
        extra = {"past_key_values": cache.hf, "use_cache": True}
    if last_logits:
        extra["logits_to_keep"] = 1
    out = model(
        tokens,
        attention_mask=full,
        position_ids=positions,
        return_type="logits" if last_logits else None,
        stop_at_layer=stop_at_layer,
        **extra,
    )
    if cache is not None:
        cache.mask = full
    return out if last_logits else None


def teacher_forced(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    attn: Int[Tensor, "batch pos"],
    names: Sequence[str] = (),
    *,
    stop_at_layer: int | None = None,
    logits: bool = False,
) -> tuple[Float[Tensor, "batch pos vocab"] | None, dict[str, Float[Tensor, "batch pos d_model"]]]:
    """One teacher-forced pass (no KV cache) over left-padded ``tokens`` on either backend: the
    logits when ``logits`` (then no ``stop_at_layer``), and the named hooks' activations. A
    bridge gets positions counted from the mask (a left pad does not shift a row), as for
    generation; a HookedTransformer derives them from the mask itself."""
    extra: dict[str, Any] = {}
    if isinstance(model, TransformerBridge):
        extra = {"position_ids": mask_positions(attn), "use_cache": False}
    if not names:  # logits alone: a plain forward pass, nothing to cache
        return model(tokens, attention_mask=attn, return_type="logits", **extra), {}
    out, acts = model.run_with_cache(
        tokens,
        attention_mask=attn,
        names_filter=list(names),
        return_type="logits" if logits else None,
        stop_at_layer=stop_at_layer,
        **extra,
    )
    return (out if logits else None), {n: acts[n] for n in names}


def mask_positions(mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Each token's position among its row's real tokens, as transformers' ``generate``
    derives them: a left pad does not shift a row (pads get 0; they are masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
