"""Attention and grouped-query attention without weight copies or repeated keys/values: Q, K and
V from one fused product, rotary tables and masks shared by all layers of a forward pass, the KV
cache in growing buffers, SDPA when nothing needs the explicit scores."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.components import AbstractAttention, Attention, GroupedQueryAttention
from transformer_lens.utilities.activation_functions import apply_softcap

from tlextract.model.accel.fused import FusedLinear, linear, no_type_check
from tlextract.model.accel.guard import Expects
from tlextract.model.accel.hooks import is_hooked, keep_name, run_hook
from tlextract.model.accel.kv import (
    ForwardMemo,
    append_kv,
    causal_mask,
    rotary_tables,
    rotate,
    rotated_keys,
)

# Architectures whose attention normalises or clips Q/K on the full projection (TL special cases).
_SPECIAL_QK_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
_CFG_READ = (
    # _tlx_supported
    "load_in_4bit", "positional_embedding_type", "use_attention_sinks", "use_logn_attn",
    "use_dynamic_ntk_rope", "clip_qkv", "original_architecture", "n_devices",
    # forward
    "use_attn_result", "use_split_qkv_input", "use_attn_in", "ungroup_grouped_query_attention",
    "attention_dir", "n_heads", "d_head", "use_qk_norm", "rotary_dim", "rotary_adjacent_pairs",
    "n_ctx", "window_size", "attn_scores_soft_cap",
)  # fmt: skip


def _expects(cfg: Any, kv_weights: tuple[str, ...], n_kv: str) -> Expects:
    """What the fast attention reads: Q/K/V/O weights of TransformerLens' shapes (``kv_weights``
    with ``n_kv`` heads), its hook points and the helpers it calls."""
    w_k, w_v, b_k, b_v = kv_weights
    heads_in, kv_in = ("n_heads", "d_model", "d_head"), (n_kv, "d_model", "d_head")
    rotary = getattr(cfg, "positional_embedding_type", None) == "rotary"
    qk_norm = getattr(cfg, "use_qk_norm", False)
    return Expects(
        params={"W_Q": heads_in, w_k: kv_in, w_v: kv_in, "W_O": ("n_heads", "d_head", "d_model"),
                "b_Q": ("n_heads", "d_head"), b_k: (n_kv, "d_head"), b_v: (n_kv, "d_head"),
                "b_O": ("d_model",)},
        attrs=("hook_q", "hook_k", "hook_v", "hook_z", "hook_attn_scores", "hook_pattern",
               "attn_scale", "IGNORE", "attn_type", "_attention_dir_override",
               *(("hook_rot_q", "hook_rot_k", "rotary_cos", "rotary_sin",
                  "_extend_rotary_embeddings") if rotary else ()),
               *(("q_norm", "k_norm", "_apply_qk_norm") if qk_norm else ())),
        cfg=_CFG_READ,
    )  # fmt: skip


@no_type_check
class FastAttention(Attention):
    """Forward of Attention / GroupedQueryAttention without weight copies or repeated K/V
    (GroupedQueryAttention's subclass reuses these methods)."""

    _tlx_memo: ForwardMemo
    _tlx_base: type[AbstractAttention]  # set by keep_name
    _tlx_qkv: FusedLinear  # set by _fuse
    _tlx_out: FusedLinear
    _tlx_kv_weights = ("W_K", "W_V", "b_K", "b_V")

    @staticmethod
    def _tlx_expects(cfg: Any) -> Expects:
        return _expects(cfg, FastAttention._tlx_kv_weights, "n_heads")

    def _tlx_supported(self) -> bool:
        """Static configuration the fast path covers (runtime flags are checked per call)."""
        cfg = self.cfg
        return (
            not cfg.load_in_4bit
            and cfg.positional_embedding_type in ("rotary", "standard")
            and not cfg.use_attention_sinks
            and not cfg.use_logn_attn
            and not cfg.use_dynamic_ntk_rope
            and cfg.clip_qkv is None
            and cfg.original_architecture not in _SPECIAL_QK_ARCHITECTURES
            and cfg.n_devices == 1
        )

    def forward(
        self,
        query_input: Tensor,
        key_input: Tensor,
        value_input: Tensor,
        past_kv_cache_entry: TransformerLensKeyValueCacheEntry | None = None,
        additive_attention_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> Tensor:
        cfg = self.cfg
        if (
            cfg.use_attn_result
            or cfg.use_split_qkv_input
            or cfg.use_attn_in
            or cfg.ungroup_grouped_query_attention
            or additive_attention_mask is not None
            or position_bias is not None
            or (self._attention_dir_override or cfg.attention_dir) != "causal"
            or query_input.ndim != 3
        ):
            return self._tlx_base.forward(
                self,
                query_input,
                key_input,
                value_input,
                past_kv_cache_entry=past_kv_cache_entry,
                additive_attention_mask=additive_attention_mask,
                attention_mask=attention_mask,
                position_bias=position_bias,
            )
        q, k, v = _project(self, query_input, key_input, value_input)
        q, k, v, offset = _cache_and_rotate(self, q, k, v, past_kv_cache_entry, attention_mask)
        return _attend(self, q, k, v, offset, attention_mask)


@no_type_check
def _project(
    attn: _Fast, query_input: Tensor, key_input: Tensor, value_input: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K and V ``[batch, pos, head, d_head]`` (hooked, QK-normed): one product when they share
    their input (ln1 not hooked), else one product each on the rows of the fused weight."""
    cfg = attn.cfg
    qkv: FusedLinear = attn._tlx_qkv
    n_kv = (qkv.slots[1].stop - qkv.slots[1].start) // cfg.d_head
    if query_input is key_input and key_input is value_input:
        # The product's heads split into Q, K and V: two ops per layer, not six.
        heads = [cfg.n_heads, n_kv, n_kv]
        q, k, v = qkv(query_input).unflatten(-1, (-1, cfg.d_head)).split(heads, dim=-2)
    else:
        weight, bias = qkv.weight()
        q, k, v = (
            linear(x, weight[qkv.rows(i)], None if bias is None else bias[qkv.rows(i)]).unflatten(
                -1, (-1, cfg.d_head)
            )
            for i, x in enumerate((query_input, key_input, value_input))
        )
    q = run_hook(attn.hook_q, q)
    k = run_hook(attn.hook_k, k)
    v = run_hook(attn.hook_v, v)
    if cfg.use_qk_norm:
        assert attn.q_norm is not None and attn.k_norm is not None
        q = attn._apply_qk_norm(q, attn.q_norm)
        k = attn._apply_qk_norm(k, attn.k_norm)
    return q, k, v


@no_type_check
def _cache_and_rotate(
    attn: _Fast,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entry: TransformerLensKeyValueCacheEntry | None,
    attention_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Append K/V to the cache and apply rotary positions: (q, keys so far, values so far, the
    position offset of the queries)."""
    cfg = attn.cfg
    past_before, k_new = None, k
    if entry is not None:
        past_before = entry.past_keys
        offset = past_before.size(1)
        k, v = append_kv(entry, k, v)
    else:
        offset = 0
    n_keys = k.shape[1]
    if q.shape[1] + offset != n_keys:
        raise ValueError(
            f"query_ctx_length {q.shape[1]} + past_kv_pos_offset {offset} != key_ctx_length "
            f"{n_keys} - you likely have a bug."
        )
    if cfg.positional_embedding_type != "rotary":
        return q, k, v, offset
    if n_keys > attn.rotary_cos.shape[0]:
        attn._extend_rotary_embeddings(min(cfg.n_ctx, max(n_keys, 2 * attn.rotary_cos.shape[0])))
    cos_q, sin_q, cos_k, sin_k = rotary_tables(attn._tlx_memo, attn, attention_mask, offset,
                                               n_keys)  # fmt: skip
    rd, adjacent = cast(int, cfg.rotary_dim), cfg.rotary_adjacent_pairs
    q = run_hook(attn.hook_rot_q, rotate(q, cos_q, sin_q, rd, adjacent))
    kv_state = entry.__dict__.get("_tlx_kv") if entry is not None else None
    if kv_state and kv_state[2] is k and not is_hooked(attn.hook_rot_k):
        # k is the buffer view append_kv left: rotate only what it appended.
        assert entry is not None and past_before is not None
        k = rotated_keys(entry, past_before, k, (k_new, cos_q, sin_q), cos_k, sin_k, rd, adjacent)
    else:
        k = run_hook(attn.hook_rot_k, rotate(k, cos_k, sin_k, rd, adjacent))
    return q, k, v, offset


@no_type_check
def _attend(
    attn: _Fast, q: Tensor, k: Tensor, v: Tensor, offset: int, attention_mask: Tensor | None
) -> Tensor:
    """softmax(q k^T) v through the output projection: SDPA, or the explicit scores when they are
    hooked, soft-capped or SDPA is off."""
    cfg, memo = attn.cfg, attn._tlx_memo
    batch, pos, n_heads, d_head = q.shape
    n_kv, n_keys = k.shape[2], k.shape[1]
    group = n_heads // n_kv
    window = cfg.window_size if attn.attn_type == "local" else None
    mask, empty = causal_mask(memo, attention_mask, offset, pos, n_keys, window, group, q.device)
    # Query heads of one key/value head side by side: [batch, kv_head, group*pos, d_head],
    # head h = kv_head * group + g, the order of TransformerLens' repeat_interleave.
    q_g = q.permute(0, 2, 1, 3).reshape(batch, n_kv, group * pos, d_head)
    k_t = k.permute(0, 2, 3, 1)  # [batch, kv_head, d_head, kv_pos]
    v_t = v.permute(0, 2, 1, 3)  # [batch, kv_head, kv_pos, d_head]
    softcap = cfg.attn_scores_soft_cap
    if (
        not memo.sdpa
        or (softcap is not None and softcap > 0)
        or is_hooked(attn.hook_attn_scores)
        or is_hooked(attn.hook_pattern)
    ):
        scores = (torch.matmul(q_g, k_t) / attn.attn_scale).view(batch, n_heads, pos, n_keys)
        scores = apply_softcap(scores, softcap)
        mask_h = mask.view(mask.shape[0], 1, group, pos, n_keys)[:, :, 0]
        scores = run_hook(attn.hook_attn_scores, torch.where(mask_h, scores, attn.IGNORE))
        pattern = torch.softmax(scores, dim=-1)
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        pattern = run_hook(attn.hook_pattern, pattern).to(device=v.device, dtype=v.dtype)
        z_g = torch.matmul(pattern.reshape(batch, n_kv, group * pos, n_keys), v_t)
    else:
        z_g = F.scaled_dot_product_attention(
            q_g, k_t.transpose(-1, -2), v_t, attn_mask=mask, scale=1.0 / attn.attn_scale
        )
        if empty is not None:  # no key at all (left padding): TransformerLens gives 0
            z_g = z_g.masked_fill(empty, 0.0)
    z = run_hook(attn.hook_z, z_g.reshape(batch, n_heads, pos, d_head).permute(0, 2, 1, 3))
    return attn._tlx_out(z.reshape(batch, pos, n_heads * d_head))


keep_name(FastAttention)


@keep_name
@no_type_check
class FastGroupedQueryAttention(GroupedQueryAttention):
    # The unexpanded [kv_head, d_model, d_head] parameters (W_K/W_V are repeat_interleave copies).
    _tlx_kv_weights = ("_W_K", "_W_V", "_b_K", "_b_V")
    _tlx_memo: ForwardMemo
    _tlx_qkv: FusedLinear
    _tlx_out: FusedLinear
    _tlx_supported = FastAttention._tlx_supported
    forward = FastAttention.forward

    @staticmethod
    def _tlx_expects(cfg: Any) -> Expects:
        return _expects(cfg, FastGroupedQueryAttention._tlx_kv_weights, "n_key_value_heads")


# What the helpers above take (a grouped-query layer is not a subclass of FastAttention).
_Fast = FastAttention | FastGroupedQueryAttention
