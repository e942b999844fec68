"""A forward pass with a KV cache on either backend: the one place that knows how a
HookedTransformer and a TransformerBridge differ there.

A HookedTransformer keeps its own ``TransformerLensKeyValueCache`` (which remembers the attention
mask of what it holds) and stops at a block on request. A TransformerBridge runs the transformers
model, whose cache (a ``DynamicCache``) holds keys and values only: :class:`BridgeCache` adds the
mask, and each pass gets the whole mask and positions counted from it, as transformers'
``generate`` gives them, so a left-padded row sits where it would alone.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache, PretrainedConfig

from tlextract.errors import TLExtractError

# What tlextract loads (tlextract.load_model): either backend, the same hook names.
Model = HookedTransformer | TransformerBridge


@dataclass
class BridgeCache:
    """A transformers cache, the attention mask of the tokens it holds, and the name the
    model's forward takes it by (``cache`` from transformers 5.24, ``past_key_values`` before;
    the old name still works there, with a deprecation warning at every step)."""

    hf: DynamicCache
    mask: Int[Tensor, "batch pos"]
    kwarg: str


KVCache = TransformerLensKeyValueCache | BridgeCache


def empty_cache(model: Model, batch: int, device: str | torch.device) -> KVCache:
    if isinstance(model, TransformerBridge):
        hf_model = model.original_model
        config = cast(PretrainedConfig, hf_model.config)
        params = inspect.signature(hf_model.forward).parameters
        return BridgeCache(
            DynamicCache(config=config),
            torch.zeros(batch, 0, dtype=torch.long, device=device),
            "cache" if "cache" in params else "past_key_values",
        )
    return TransformerLensKeyValueCache.init_cache(model.cfg, device, batch)


# Context levels for forward_hooks' own hooks: one per use, so nested uses remove only theirs.
_LEVELS = itertools.count(1 << 20)


@contextmanager
def forward_hooks(
    model: Model, hooks: Sequence[tuple[str, Callable[..., object]]]
) -> Iterator[None]:
    """``model.hooks(fwd_hooks=hooks)`` for named hooks, with each name looked up once on a
    bridge: its ``hooks()`` rebuilds the table of hook points for every hook it adds (7 ms each
    on SmolLM2: 0.2 s per batch for capture on all 30 layers)."""
    if not isinstance(model, TransformerBridge):
        with model.hooks(fwd_hooks=list(hooks)):
            yield
        return
    points, level, added = model.hook_dict, next(_LEVELS), []
    try:
        for name, fn in hooks:
            if name not in points:
                raise TLExtractError(f"{model.cfg.model_name} has no hook named {name}")
            points[name].add_hook(fn, dir="fwd", level=level)
            added.append(points[name])
        yield
    finally:
        for point in added:
            point.remove_hooks("fwd", level=level)


def shares_prefix(model: Model) -> bool:
    """Whether rows may share a prompt prefix's keys and values, with padding between it and
    each row's rest: positions come from the mask, but a sliding window counts cache columns,
    pads included, and ALiBi or learned-offset schemes are not checked; rotary models without a
    window share."""
    if isinstance(model, TransformerBridge):
        config = cast(PretrainedConfig, model.original_model.config).get_text_config()
        rotary = getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)
        types = set(getattr(config, "layer_types", None) or ["full_attention"])
        return (
            bool(rotary)
            and not getattr(config, "sliding_window", None)
            and types == {"full_attention"}
        )
    cfg = model.cfg
    return cfg.positional_embedding_type in ("rotary", "standard") and not cfg.use_local_attn


def prefix_filled(
    model: Model, prefix: Int[Tensor, "1 n"], rows: int, stop_at_layer: int | None
) -> KVCache:
    """A cache for ``rows`` rows holding ``prefix``'s keys and values (computed once, at batch
    1; only the blocks before ``stop_at_layer``), every row a view of them until appended to."""
    device = prefix.device
    ones = torch.ones_like(prefix)
    cache = empty_cache(model, 1, device)
    if isinstance(cache, BridgeCache):
        assert isinstance(model, TransformerBridge)
        bridge_pass(model, prefix, ones, cache, stop_at_layer=stop_at_layer)
        cache.hf.batch_repeat_interleave(rows)  # a copy: the first append would copy anyway
        cache.mask = cache.mask.expand(rows, -1)
        return cache
    model(
        prefix,
        attention_mask=ones,
        past_kv_cache=cache,
        stop_at_layer=stop_at_layer or model.cfg.n_layers,  # the residual, not logits
    )
    for entry in cache.entries:
        entry.past_keys = entry.past_keys.expand(rows, -1, -1, -1)
        entry.past_values = entry.past_values.expand(rows, -1, -1, -1)
    cache.previous_attention_mask = cache.previous_attention_mask.expand(rows, -1)
    return cache


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


def _bridge_inputs(
    tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"], cache: BridgeCache | None
) -> tuple[Int[Tensor, "batch total"], dict[str, Any]]:
    """The whole attention mask (what ``cache`` holds, then ``mask``) and a bridge pass's other
    arguments: positions counted from that mask, as transformers' ``generate`` counts them (a
    left pad does not shift a row), and the cache, if any."""
    full = mask if cache is None else torch.cat([cache.mask, mask], dim=1)
    kwargs: dict[str, Any] = {"position_ids": mask_positions(full)[:, -tokens.shape[1] :]}
    kwargs["use_cache"] = cache is not None  # a pass without a cache keeps none
    if cache is not None:
        kwargs[cache.kwarg] = cache.hf
    return full, kwargs


def bridge_pass(
    model: TransformerBridge,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    cache: BridgeCache,
    *,
    last_logits: bool = False,
    stop_at_layer: int | None = None,
) -> Float[Tensor, "batch 1 vocab"] | None:
    """One pass of the transformers model under the bridge's hooks, appending to ``cache``;
    the logits at the last position only when ``last_logits`` (unembedding every prompt
    position is wasted work), else none (``stop_at_layer``: the blocks before it only)."""
    full, kwargs = _bridge_inputs(tokens, mask, cache)
    if last_logits:
        kwargs["logits_to_keep"] = 1
    out = model(
        tokens,
        attention_mask=full,
        return_type="logits" if last_logits else None,
        stop_at_layer=stop_at_layer,
        **kwargs,
    )
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
    cache: BridgeCache | None = None,
) -> tuple[Float[Tensor, "batch pos vocab"] | None, dict[str, Float[Tensor, "batch pos d_model"]]]:
    """One teacher-forced pass over left-padded ``tokens`` on either backend: the logits when
    ``logits`` (then no ``stop_at_layer``), and the named hooks' activations. A bridge gets
    positions counted from the mask (a left pad does not shift a row), as for generation, after
    the tokens already in ``cache`` (a shared prefix) if one is given; a HookedTransformer
    derives them from the mask itself."""
    extra: dict[str, Any] = {}
    mask = attn
    if isinstance(model, TransformerBridge):
        mask, extra = _bridge_inputs(tokens, attn, cache)
    if not names:  # logits alone: a plain forward pass, nothing to cache
        return model(tokens, attention_mask=mask, return_type="logits", **extra), {}
    out, acts = model.run_with_cache(
        tokens,
        attention_mask=mask,
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
