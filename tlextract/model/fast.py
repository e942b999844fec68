"""Faster CPU inference for a HookedTransformer, with every hook point kept.

TransformerLens 3.9 rebuilds weights on every forward pass: ``Unembed`` and ``GatedMLP`` call
``W.T.contiguous()`` (a full copy of each matrix, the 113 MB unembedding included, for a single
decode step), attention rearranges ``W_Q/W_K/W_V/W_O`` with einops into fresh contiguous copies,
rotary embeddings clone and scatter the keys and gather the sin/cos tables in every layer, and
grouped-query attention ``repeat_interleave``-s the whole key/value cache. On a CPU that copying,
not the arithmetic, is most of the time.

:func:`accelerate` swaps the class of the supported components for a subclass whose ``forward``
computes the same values from TransformerLens' own parameters, read through views (no copy, no
second set of weights, so edits of the weights are seen at once):

* ``TransformerBlock`` (pre-norm, sequential attention then MLP; ``ln1`` is computed once instead
  of three times unless something is hooked inside it),
* ``Attention`` and ``GroupedQueryAttention`` (rotary or no positional term, causal, global or
  local windows, QK-norm, score soft-capping; keys/values of a grouped-query layer are never
  repeated; the rotary sin/cos and the mask are built once per forward pass and shared by all
  layers; the key/value cache grows in a preallocated buffer instead of ``torch.cat``),
* ``RMSNorm``, ``GatedMLP`` and ``Unembed``.

Every hook point still fires with the same values and shapes (``hook_q/k/v``, ``hook_rot_q/k``,
``hook_attn_scores``, ``hook_pattern``, ``hook_z``, ``hook_resid_*``, ``hook_mlp_*``, norm
hooks...), so ``run_with_cache``, ``hooks()`` and ``run_with_hooks`` work unchanged. A hook point
with no hook is skipped instead of called (the same test ``nn.Module.__call__`` makes before it
calls the identity ``forward``). The state dict, parameter names and hook names are
TransformerLens'; ``isinstance`` checks still hold.

Results equal the unpatched model up to float32 rounding (matrix products run with the weights in
a different memory layout, so BLAS may sum in another order). Anything a fast path does not
cover (a configuration flag such as ``use_attn_result`` or ``use_split_qkv_input``, set even after
``accelerate``; ALiBi; attention sinks; multi-device models; 4-bit weights; other component
types) runs TransformerLens' own code.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.components import (
    AbstractAttention,
    Attention,
    GroupedQueryAttention,
    RMSNorm,
    TransformerBlock,
    Unembed,
)
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.activation_functions import apply_softcap
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from tlextract.model.fused import FusedLinear, linear, no_type_check, packed_weights

log = logging.getLogger(__name__)

# Architectures whose attention normalises or clips Q/K on the full projection (TL special cases).
_SPECIAL_QK_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")

# Spare key/value cache positions allocated whenever the cache buffer must grow.
_KV_GROWTH = 64


# --- hooks ---


@no_type_check
def _hooked(m: nn.Module, pre_hooks: bool = True) -> bool:
    """Whether calling ``m`` would run any hook: the test ``nn.Module._call_impl`` makes."""
    return bool(
        m._forward_hooks
        or (pre_hooks and m._forward_pre_hooks)
        or m._backward_hooks
        or m._backward_pre_hooks
        or _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or _torch_module._global_backward_hooks
        or _torch_module._global_backward_pre_hooks
    )


@no_type_check
def _hp(hook: HookPoint, x: Tensor) -> Tensor:
    """``hook(x)``; a HookPoint's forward is the identity, so without hooks it is just ``x``."""
    return hook(x) if _hooked(hook) else x


@no_type_check
def has_hooks(m: nn.Module) -> bool:
    """Whether any hook is attached to ``m`` or a module inside it, apart from the forward
    pre-hook :func:`accelerate` puts on the model (it only resets per-pass memos)."""
    memo = m.__dict__.get("_tlx_memo")
    only_ours = memo is not None and all(h == memo.reset for h in m._forward_pre_hooks.values())
    return _hooked(m, pre_hooks=not only_ours) or any(
        _hooked(sub) for sub in m.modules() if sub is not m
    )


def _keep_name(cls: type) -> type:
    """Mark an accelerated subclass (single inheritance, so ``__class__`` can be swapped) and keep
    TransformerLens' class name in the module repr."""
    base = cls.__bases__[0]
    cls._tlx_base = base  # type: ignore[attr-defined]
    cls._get_name = lambda self: base.__name__  # type: ignore[attr-defined]
    return cls


# --- per-forward shared state: rotary sin/cos and attention masks ---


@no_type_check
class _ForwardMemo:
    """Rotary tables and masks of the current forward pass, shared by all attention layers.

    Every block of one ``HookedTransformer.forward`` receives the same ``attention_mask`` object
    and the same cache offset, so what is derived from them is computed by the first layer and
    reused by the others. Entries are kept for the latest mask only (the mask object is held, so
    its id cannot be reused by another tensor while it is the key)."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None
        self.key: tuple[Any, ...] = ()
        self.entries: dict[Any, Any] = {}
        self.sdpa = True  # see accelerate()
        # (cos, sin) tables seen so far; each layer holds its own copy of equal tables.
        self.rotary_tables: list[tuple[Tensor, Tensor]] = []

    def reset(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the model: nothing carries over from one forward pass to the next
        (an inference-mode mask has no version counter to tell that it was edited in place)."""
        self.mask, self.key, self.entries = None, (), {}

    def get(self, attention_mask: Tensor | None, frame: tuple[int, int], name: Any) -> Any:
        # Inference tensors have no version counter (and cannot change outside inference mode).
        version = (
            -1 if attention_mask is None or attention_mask.is_inference()
            else attention_mask._version
        )
        # Tensors made in inference mode must not reach a forward pass autograd records.
        key = (frame, version, torch.is_inference_mode_enabled())
        if attention_mask is not self.mask or key != self.key:
            self.mask, self.key, self.entries = attention_mask, key, {}
        return self.entries.get(name)

    def put(self, name: Any, value: Any) -> Any:
        self.entries[name] = value
        return value


@no_type_check
def _shared_rotary_table(memo: _ForwardMemo, attn: AbstractAttention) -> int:
    """An index shared by the layers whose rotary cos/sin tables are equal.

    TransformerLens gives every layer its own copy of the tables (Gemma has two kinds, local and
    global); layers with equal tables can share the cos/sin gathered for one forward pass. The
    comparison is made once per table object (again after a layer extends its tables)."""
    cos, sin = attn.rotary_cos, attn.rotary_sin
    seen = attn.__dict__.get("_tlx_rotary")
    if seen is not None and seen[0] is cos and seen[1] is sin:
        return seen[2]
    for i, (c, s) in enumerate(memo.rotary_tables):
        if c is cos and s is sin or (
            c.shape == cos.shape and c.dtype == cos.dtype and c.device == cos.device
            and s.shape == sin.shape and torch.equal(c, cos) and torch.equal(s, sin)
        ):
            index = i
            break
    else:
        if len(memo.rotary_tables) >= 16:  # outgrown tables of extended layers
            memo.rotary_tables.clear()
            memo.entries = {}
        memo.rotary_tables.append((cos, sin))
        index = len(memo.rotary_tables) - 1
    attn.__dict__["_tlx_rotary"] = (cos, sin, index)
    return index


@no_type_check
def _rotary_tables(
    memo: _ForwardMemo,
    attn: AbstractAttention,
    attention_mask: Tensor | None,
    offset: int,
    n_keys: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cos/sin for the queries [., pos, 1, rotary_dim] and the keys [., kv_pos, 1, rotary_dim],
    indexed exactly as ``AbstractAttention.apply_rotary`` does."""
    table = _shared_rotary_table(memo, attn)
    name = ("rotary", table)
    hit = memo.get(attention_mask, (offset, n_keys), name)
    if hit is not None:
        return hit
    cos_table, sin_table = attn.rotary_cos, attn.rotary_sin
    if attention_mask is None:
        cos_k = cos_table[None, :n_keys, None, :]
        sin_k = sin_table[None, :n_keys, None, :]
    else:
        # utilities.get_offset_position_ids with offset 0; the queries take the last columns.
        positions = attention_mask.cumsum(dim=1) - 1
        positions = positions.masked_fill(positions < 0, 0).to(cos_table.device)
        cos_k = cos_table[positions, None, :]
        sin_k = sin_table[positions, None, :]
    return memo.put(name, (cos_k[:, offset:], sin_k[:, offset:], cos_k, sin_k))


@no_type_check
def _attention_mask(
    memo: _ForwardMemo,
    attention_mask: Tensor | None,
    offset: int,
    n_queries: int,
    n_keys: int,
    window: int | None,
    group: int,
) -> tuple[Tensor, Tensor | None]:
    """The boolean mask [batch|1, 1, pos, kv_pos] of ``AbstractAttention.apply_causal_mask``,
    the same mask with its query rows repeated ``group`` times ([., 1, group*pos, kv_pos], for
    grouped queries), and the rows with no key at all in that layout (None when there are none)."""
    name = ("mask", window, group)
    hit = memo.get(attention_mask, (offset, n_keys), name)
    if hit is not None:
        return hit
    device = attention_mask.device if attention_mask is not None else None
    query_pos = torch.arange(offset, offset + n_queries, device=device)
    key_pos = torch.arange(n_keys, device=device)
    mask = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        mask = mask & (key_pos[None, :] > query_pos[:, None] - window)
    mask = mask[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
    grouped = mask.repeat(1, 1, group, 1) if group > 1 else mask
    empty = ~grouped.any(dim=-1, keepdim=True)
    result = (grouped, empty if bool(empty.any()) else None)
    memo.put(name, result)
    return result


@no_type_check
def _append_kv(
    entry: TransformerLensKeyValueCacheEntry, k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor]:
    """``entry.append(k, v)`` without copying the whole cache on every step.

    The keys/values live in a buffer with spare positions and ``past_keys``/``past_values`` are
    views of its filled part. Whenever they are not the views we left there (the cache was
    replaced, reindexed or trimmed by its user), a fresh buffer is built from them."""
    if entry.frozen or (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)):
        return entry.append(k, v)  # in-place writes would break autograd
    buf = entry.__dict__.get("_tlx_kv")
    past_k, past_v = entry.past_keys, entry.past_values
    n_old, n_new = past_k.shape[1], k.shape[1]
    if (
        buf is None
        or buf[2] is not past_k
        or buf[3] is not past_v
        or buf[0].shape[1] < n_old + n_new
        or buf[0].shape[0] != k.shape[0]
        or buf[0].shape[2:] != k.shape[2:]
        or buf[0].dtype != k.dtype
        or buf[0].device != k.device
        or (buf[0].is_inference() and not torch.is_inference_mode_enabled())
    ):
        if past_k.shape[0] != k.shape[0] or past_k.shape[2:] != k.shape[2:]:
            return entry.append(k, v)  # let TransformerLens raise its own error
        capacity = n_old + n_new + max(_KV_GROWTH, (n_old + n_new) // 2)
        shape = (k.shape[0], capacity, *k.shape[2:])
        buf_k = torch.empty(shape, dtype=k.dtype, device=k.device)
        buf_v = torch.empty(shape, dtype=v.dtype, device=v.device)
        buf_k[:, :n_old] = past_k
        buf_v[:, :n_old] = past_v
    else:
        buf_k, buf_v = buf[0], buf[1]
    buf_k[:, n_old : n_old + n_new] = k
    buf_v[:, n_old : n_old + n_new] = v
    new_k, new_v = buf_k[:, : n_old + n_new], buf_v[:, : n_old + n_new]
    entry.past_keys, entry.past_values = new_k, new_v
    entry.__dict__["_tlx_kv"] = (buf_k, buf_v, new_k, new_v)
    return new_k, new_v


@no_type_check
def _rotated_keys(
    entry: TransformerLensKeyValueCacheEntry,
    past_before: Tensor,
    keys: Tensor,
    cos_k: Tensor,
    sin_k: Tensor,
    rotary_dim: int,
    adjacent: bool,
) -> Tensor:
    """The rotated keys ``[batch, kv_pos, kv_head, d_head]``, rotating only the new ones.

    TransformerLens caches keys before rotation and rotates the whole history at every step
    (a third of the element-wise work of a batch-16 decode step). A cached key keeps its
    position, so its rotation never changes: rotated keys are kept in a buffer of their own,
    valid while the cache still holds the keys left there at the previous step
    (``past_before`` is what ``past_keys`` was before this step's append)."""
    n_old, n_keys = past_before.shape[1], keys.shape[1]
    buf, source = entry.__dict__.get("_tlx_krot", (None, None))
    if (
        buf is None
        or source is not past_before
        or buf.shape[1] < n_keys
        or buf.shape[0] != keys.shape[0]
        or buf.shape[2:] != keys.shape[2:]
        or buf.dtype != keys.dtype
        or buf.device != keys.device
        or (buf.is_inference() and not torch.is_inference_mode_enabled())
    ):
        shape = (keys.shape[0], n_keys + max(_KV_GROWTH, n_keys // 2), *keys.shape[2:])
        buf = torch.empty(shape, dtype=keys.dtype, device=keys.device)
        n_old = 0
    buf[:, n_old:n_keys] = _rotate(
        keys[:, n_old:], cos_k[:, n_old:], sin_k[:, n_old:], rotary_dim, adjacent
    )
    entry.__dict__["_tlx_krot"] = (buf, entry.past_keys)
    return buf[:, :n_keys]


@no_type_check
def _rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, adjacent: bool) -> Tensor:
    """``AbstractAttention.apply_rotary`` with precomputed cos/sin (same operations, same
    values)."""
    full = rotary_dim == x.shape[-1]
    x_rot = x if full else x[..., :rotary_dim]
    if adjacent:
        x_flip = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        x_flip = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    rotated = x_rot * cos + x_flip * sin
    return rotated if full else torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


# --- components ---


@no_type_check
class _FastAttention(Attention):
    """Forward of Attention / GroupedQueryAttention without weight copies or repeated K/V
    (GroupedQueryAttention's subclass reuses these methods)."""

    _tlx_memo: _ForwardMemo
    _tlx_base: type[AbstractAttention]  # set by _keep_name
    _tlx_qkv: FusedLinear  # set by _fuse
    _tlx_out: FusedLinear
    _tlx_kv_weights = ("W_K", "W_V", "b_K", "b_V")

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
        n_heads, d_head = cfg.n_heads, cfg.d_head
        qkv: FusedLinear = self._tlx_qkv
        n_kv = (qkv.slots[1].stop - qkv.slots[1].start) // d_head
        group = n_heads // n_kv
        batch, pos, d_model = query_input.shape

        # Q, K and V from one product when they share their input (ln1 not hooked), else one
        # product each on the rows of the fused weight; [batch, pos, head, d_head] views.
        if query_input is key_input and key_input is value_input:
            out = qkv(query_input)
            q, k, v = (out[..., qkv.rows(i)] for i in range(3))
        else:
            weight, bias = qkv.weight()
            q, k, v = (
                linear(x, weight[qkv.rows(i)], None if bias is None else bias[qkv.rows(i)])
                for i, x in enumerate((query_input, key_input, value_input))
            )
        q = _hp(self.hook_q, q.unflatten(-1, (n_heads, d_head)))
        k = _hp(self.hook_k, k.unflatten(-1, (n_kv, d_head)))
        v = _hp(self.hook_v, v.unflatten(-1, (n_kv, d_head)))
        if cfg.use_qk_norm:
            assert self.q_norm is not None and self.k_norm is not None
            q = self._apply_qk_norm(q, self.q_norm)
            k = self._apply_qk_norm(k, self.k_norm)

        past_before = None
        if past_kv_cache_entry is not None:
            past_before = past_kv_cache_entry.past_keys
            offset = past_before.size(1)
            k, v = _append_kv(past_kv_cache_entry, k, v)
        else:
            offset = 0
        n_keys = k.shape[1]
        if pos + offset != n_keys:
            raise ValueError(
                f"query_ctx_length {pos} + past_kv_pos_offset {offset} != key_ctx_length "
                f"{n_keys} - you likely have a bug."
            )
        memo = self._tlx_memo

        if cfg.positional_embedding_type == "rotary":
            if n_keys > self.rotary_cos.shape[0]:
                self._extend_rotary_embeddings(
                    min(cfg.n_ctx, max(n_keys, 2 * self.rotary_cos.shape[0]))
                )
            cos_q, sin_q, cos_k, sin_k = _rotary_tables(
                memo, self, attention_mask, offset, n_keys
            )
            rd, adjacent = cast(int, cfg.rotary_dim), cfg.rotary_adjacent_pairs
            q = _hp(self.hook_rot_q, _rotate(q, cos_q, sin_q, rd, adjacent))
            kv_state = past_kv_cache_entry and past_kv_cache_entry.__dict__.get("_tlx_kv")
            if kv_state and kv_state[2] is k and not _hooked(self.hook_rot_k):
                # k is the buffer view _append_kv left: rotate only what it appended.
                assert past_kv_cache_entry is not None and past_before is not None
                k = _rotated_keys(
                    past_kv_cache_entry, past_before, k, cos_k, sin_k, rd, adjacent
                )
            else:
                k = _hp(self.hook_rot_k, _rotate(k, cos_k, sin_k, rd, adjacent))

        window = cfg.window_size if self.attn_type == "local" else None
        mask, empty = _attention_mask(memo, attention_mask, offset, pos, n_keys, window, group)

        # Query heads of one key/value head side by side: [batch, kv_head, group*pos, d_head],
        # head h = kv_head * group + g, the order of TransformerLens' repeat_interleave.
        q_g = q.permute(0, 2, 1, 3).reshape(batch, n_kv, group * pos, d_head)
        k_t = k.permute(0, 2, 3, 1)  # [batch, kv_head, d_head, kv_pos]
        v_t = v.permute(0, 2, 1, 3)  # [batch, kv_head, kv_pos, d_head]
        softcap = cfg.attn_scores_soft_cap
        if (
            not memo.sdpa
            or (softcap is not None and softcap > 0)
            or _hooked(self.hook_attn_scores)
            or _hooked(self.hook_pattern)
        ):
            scores = (torch.matmul(q_g, k_t) / self.attn_scale).view(batch, n_heads, pos, n_keys)
            scores = apply_softcap(scores, softcap)
            mask_h = mask.view(mask.shape[0], 1, group, pos, n_keys)[:, :, 0]
            scores = torch.where(mask_h, scores, self.IGNORE)
            scores = _hp(self.hook_attn_scores, scores)
            pattern = torch.softmax(scores, dim=-1)
            pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
            pattern = _hp(self.hook_pattern, pattern).to(device=v.device, dtype=v.dtype)
            z_g = torch.matmul(pattern.reshape(batch, n_kv, group * pos, n_keys), v_t)
        else:
            z_g = F.scaled_dot_product_attention(
                q_g, k_t.transpose(-1, -2), v_t, attn_mask=mask, scale=1.0 / self.attn_scale
            )
            if empty is not None:  # no key at all (left padding): TransformerLens gives 0
                z_g = z_g.masked_fill(empty, 0.0)
        z = _hp(self.hook_z, z_g.reshape(batch, n_heads, pos, d_head).permute(0, 2, 1, 3))
        return self._tlx_out(z.reshape(batch, pos, n_heads * d_head))


_keep_name(_FastAttention)


@_keep_name
@no_type_check
class _FastGroupedQueryAttention(GroupedQueryAttention):
    # The unexpanded [kv_head, d_model, d_head] parameters (W_K/W_V are repeat_interleave copies).
    _tlx_kv_weights = ("_W_K", "_W_V", "_b_K", "_b_V")
    _tlx_memo: _ForwardMemo
    _tlx_qkv: FusedLinear
    _tlx_out: FusedLinear
    _tlx_supported = _FastAttention._tlx_supported
    forward = _FastAttention.forward


@_keep_name
@no_type_check
class _FastRMSNorm(RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        scale = _hp(self.hook_scale, (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = _hp(self.hook_normalized, x / scale).to(self.cfg.dtype)
        return x * self.w


@_keep_name
@no_type_check
class _FastGatedMLP(GatedMLP):
    _tlx_gate_up: FusedLinear
    _tlx_out: FusedLinear

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.is_layer_norm_activation():
            return super().forward(x)
        gate_up: FusedLinear = self._tlx_gate_up
        out = gate_up(x)
        pre_act = _hp(self.hook_pre, out[..., gate_up.rows(0)])
        pre_linear = _hp(self.hook_pre_linear, out[..., gate_up.rows(1)])
        post_act = _hp(self.hook_post, self.act_fn(pre_act) * pre_linear + self.b_in)
        return self._tlx_out(post_act)


@_keep_name
@no_type_check
class _FastUnembed(Unembed):
    _tlx_out: FusedLinear

    def forward(self, residual: Tensor) -> Tensor:
        residual = _hp(self.hook_in, residual)
        return _hp(self.hook_out, self._tlx_out(residual))


@_keep_name
@no_type_check
class _FastTransformerBlock(TransformerBlock):
    """Pre-norm block, attention then MLP; ``ln1`` runs once for Q, K and V unless hooked."""

    def _tlx_supported(self) -> bool:
        cfg = self.cfg
        return (
            not cfg.attn_only
            and not cfg.parallel_attn_mlp
            and cfg.original_architecture not in POST_NORM_ARCHITECTURES
            and cfg.n_devices == 1
        )

    def forward(
        self,
        resid_pre: Tensor,
        shortformer_pos_embed: Tensor | None = None,
        past_kv_cache_entry: TransformerLensKeyValueCacheEntry | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        cfg = self.cfg
        if shortformer_pos_embed is not None or cfg.use_attn_in or cfg.use_split_qkv_input:
            return super().forward(
                resid_pre,
                shortformer_pos_embed=shortformer_pos_embed,
                past_kv_cache_entry=past_kv_cache_entry,
                attention_mask=attention_mask,
            )
        resid_pre = _hp(self.hook_resid_pre, resid_pre)
        ln1_hooked = _hooked(self.ln1) or any(
            h is not None and _hooked(h) for h in self.ln1._modules.values()
        )
        if ln1_hooked:  # TransformerLens normalises once each for Q, K and V
            q_in, k_in, v_in = self.ln1(resid_pre), self.ln1(resid_pre), self.ln1(resid_pre)
        else:
            q_in = k_in = v_in = self.ln1(resid_pre)
        attn_out = self.attn(
            query_input=q_in,
            key_input=k_in,
            value_input=v_in,
            past_kv_cache_entry=past_kv_cache_entry,
            attention_mask=attention_mask,
        )
        if cfg.use_normalization_before_and_after:
            attn_out = self.ln1_post(attn_out)
        attn_out = _hp(self.hook_attn_out, attn_out)
        resid_mid = _hp(self.hook_resid_mid, resid_pre + attn_out)
        mlp_in = resid_mid if not cfg.use_hook_mlp_in else self.hook_mlp_in(resid_mid.clone())
        mlp_out = self.mlp(self.ln2(mlp_in))
        if cfg.use_normalization_before_and_after:
            mlp_out = self.ln2_post(mlp_out)
        mlp_out = _hp(self.hook_mlp_out, mlp_out)
        return _hp(self.hook_resid_post, resid_mid + mlp_out)


_FAST_ATTENTION = (_FastAttention, _FastGroupedQueryAttention)


def _fuse(module: nn.Module) -> None:
    """Give an accelerated component its fused weights (see fused.py); parameters become views."""
    if "_tlx_out" in module.__dict__:
        return
    if isinstance(module, _FAST_ATTENTION):
        w_k, w_v, b_k, b_v = module._tlx_kv_weights
        module.__dict__["_tlx_qkv"] = FusedLinear(
            module, [("W_Q", "heads_in"), (w_k, "heads_in"), (w_v, "heads_in")], ["b_Q", b_k, b_v]
        )
        module.__dict__["_tlx_out"] = FusedLinear(module, [("W_O", "heads_out")], ["b_O"])
    elif isinstance(module, _FastGatedMLP):
        module.__dict__["_tlx_gate_up"] = FusedLinear(
            module, [("W_gate", "in_out"), ("W_in", "in_out")]
        )
        module.__dict__["_tlx_out"] = FusedLinear(module, [("W_out", "in_out")], ["b_out"])
    elif isinstance(module, _FastUnembed):
        module.__dict__["_tlx_out"] = FusedLinear(module, [("W_U", "in_out")], ["b_U"])
_FAST_CLASSES: dict[type, type] = {
    TransformerBlock: _FastTransformerBlock,
    Attention: _FastAttention,
    GroupedQueryAttention: _FastGroupedQueryAttention,
    RMSNorm: _FastRMSNorm,
    GatedMLP: _FastGatedMLP,
    Unembed: _FastUnembed,
}


def accelerate(model: HookedTransformer, *, sdpa: bool = True) -> HookedTransformer:
    """Make ``model``'s forward passes fast on CPU, in place; returns ``model``.

    Components of exactly the types listed in the module docstring get a faster ``forward``;
    everything else is left as is. Idempotent (a second call only updates ``sdpa``). Hooks, hook
    names, parameters and the state dict are unchanged.

    ``sdpa``: compute attention with ``F.scaled_dot_product_attention`` whenever nothing is
    hooked on ``hook_attn_scores``/``hook_pattern`` and scores are not soft-capped (3x faster
    attention on long prompts, no [batch, head, pos, pos] tensors; logits then differ from
    TransformerLens' by float32 rounding, about 1e-4 on logits of size 30). With ``sdpa=False``
    attention runs TransformerLens' explicit operations and outputs are bitwise equal on CPU."""
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"accelerate expects a HookedTransformer, got {type(model).__name__}")
    if model.cfg.n_devices != 1:
        log.info("accelerate: model spread over %d devices, left as is", model.cfg.n_devices)
        return model
    memo = model.__dict__.get("_tlx_memo")
    if memo is None:
        memo = _ForwardMemo()
        model.__dict__["_tlx_memo"] = memo
        model.register_forward_pre_hook(memo.reset)
    memo.sdpa = sdpa
    swapped: dict[str, int] = {}
    for module in model.modules():
        fast = _FAST_CLASSES.get(type(module))
        if fast is None:
            continue
        module.__class__ = fast
        supported = getattr(module, "_tlx_supported", None)
        if supported is not None and not supported():
            module.__class__ = fast._tlx_base  # type: ignore[attr-defined]
            continue
        if isinstance(module, _FAST_ATTENTION):
            module.__dict__["_tlx_memo"] = memo
        _fuse(module)
        name = fast._tlx_base.__name__  # type: ignore[attr-defined]
        swapped[name] = swapped.get(name, 0) + 1
    model.__dict__["_tlx_fused"] = [
        f for m in model.modules() for f in m.__dict__.values() if isinstance(f, FusedLinear)
    ]
    if swapped:
        log.debug("accelerate: %s", ", ".join(f"{n} {k}" for k, n in sorted(swapped.items())))
    return model


def decode_session(model: HookedTransformer) -> AbstractContextManager[None]:
    """Context for many forward passes with fixed weights (a generation): an accelerated model's
    products use oneDNN's packed weights inside (see fused.packed_weights); any other model runs
    as it is."""
    return packed_weights(model.__dict__.get("_tlx_fused", ()))
