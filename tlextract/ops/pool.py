"""Teacher-forced residual activations, pooled over response tokens only.

Layer convention: layer ``l`` is TransformerLens block ``l`` (0-based) and the hook is
``blocks.{l}.hook_resid_post``, the block's output. That equals transformers'
``hidden_states[l + 1]`` for every block but the last (``hidden_states[0]`` is the embedding):
the last entry, ``hidden_states[n_layers]``, is the final norm's output, and the last block's
output is not among transformers' ``hidden_states`` (see :mod:`tlextract.ops.formats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.model_bridge import TransformerBridge

from tlextract.config import DEFAULT_HOOK
from tlextract.errors import TLExtractError
from tlextract.model.accel import has_hooks
from tlextract.model.decoding import BridgeCache, Model, teacher_forced
from tlextract.model.tokens import device_of, left_pad, tokenizer_of
from tlextract.ops.generate import prefix_cache


def hook_name(hook: str, layer: int) -> str:
    return f"blocks.{layer}.hook_{hook}"


def resolve_layers(spec: Sequence[int] | Literal["all"], n_layers: int) -> tuple[int, ...]:
    """'all' or block indices, checked against the model."""
    if spec == "all":
        return tuple(range(n_layers))
    bad = [layer for layer in spec if not 0 <= layer < n_layers]
    if bad:
        raise TLExtractError(
            f"layers {bad} do not exist: this model has blocks 0..{n_layers - 1} "
            "(TransformerLens block indices, 0-based). Fix layers=.",
            parameters=("layers",),
        )
    return tuple(sorted(set(spec)))


def pack(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
    skip: int = 0,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Left-padded prompt+response tokens after the first ``skip`` (a shared prefix already in
    the KV cache), the attention mask, and a mask of response positions."""
    full = [list(p)[skip:] + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    tokens, attn = left_pad(full, pad_id, device)
    width = tokens.shape[1]
    n_resp = torch.tensor([len(r) for r in response_ids], device=device)
    positions = torch.arange(width, device=device)
    response = positions[None, :] >= (width - n_resp)[:, None]
    return tokens, attn, response


def masked_mean(
    resid: Float[Tensor, "batch layer pos d_model"], mask: Bool[Tensor, "batch pos"]
) -> Float[Tensor, "batch layer d_model"]:
    """Mean over the masked positions, in float32; padding and prompt never enter the sum."""
    weights = mask.float()
    counts = weights.sum(dim=1)
    if (counts == 0).any():
        raise ValueError("masked_mean: a row has no response token to pool over")
    # [b, 1, 1, p] @ [b, l, p, d]: one batched product over (b, l), no copy of resid
    # (an einsum here transposed all of it first).
    total = torch.matmul(weights[:, None, None, :], resid.float()).squeeze(-2)
    return total / counts[:, None, None]


@torch.inference_mode()
def pooled_activations(
    model: Model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    hook: str = DEFAULT_HOOK,
) -> Float[Tensor, "batch layer d_model"]:
    """One teacher-forced pass; the hook's output at each response token, averaged per example.

    The rows' common prompt prefix is computed once (see generation.prefix_cache) unless hooks
    are attached: its activations are never pooled, only its keys and values are needed."""
    names = [hook_name(hook, layer) for layer in layers]
    stop = max(layers) + 1  # later blocks cannot change these activations
    limit = min(map(len, prompt_ids))  # the prefix never reaches a response token
    cache, shared = prefix_cache(model, prompt_ids, limit, not has_hooks(model), stop)
    if isinstance(cache, BridgeCache):
        assert isinstance(model, TransformerBridge)
        tokens, attn, response = pack(
            prompt_ids, response_ids, tokenizer_of(model).pad_token_id, device_of(model), shared
        )
        prefix = cache if shared else None
        _, by_name = teacher_forced(model, tokens, attn, names, stop_at_layer=stop, cache=prefix)
        return torch.cat([masked_mean(by_name[n][:, None], response) for n in names], dim=1).cpu()
    # Only the prefix's keys/values are read: a frozen cache is not appended to (TransformerLens
    # then concatenates per layer and drops the result), and with no prefix there is no cache,
    # so the pass does not keep every token's keys and values (as large as the residuals).
    assert isinstance(cache, TransformerLensKeyValueCache)
    cache.freeze()
    tokens, attn, response = pack(
        prompt_ids, response_ids, tokenizer_of(model).pad_token_id, device_of(model), shared
    )
    _, acts = model.run_with_cache(
        tokens,
        attention_mask=attn,
        past_kv_cache=cache if shared else None,
        names_filter=names,
        return_type=None,
        stop_at_layer=stop,
    )
    pooled = [masked_mean(acts[n][:, None], response) for n in names]  # no [b, l, p, d] stack
    return torch.cat(pooled, dim=1).cpu()
