"""What one forward pass shares between layers (rotary cos/sin, attention masks) and the
key/value cache kept in buffers that grow without copying (and rotated keys kept next to it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.components import AbstractAttention

from tlextract.model.accel.fused import no_type_check

# Spare key/value cache positions allocated whenever the cache buffer must grow.
_KV_GROWTH = 64


@no_type_check
class ForwardMemo:
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
            -1
            if attention_mask is None or attention_mask.is_inference()
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
def _shared_rotary_table(memo: ForwardMemo, attn: AbstractAttention) -> int:
    """An index shared by the layers whose rotary cos/sin tables are equal.

    TransformerLens gives every layer its own copy of the tables (Gemma has two kinds, local and
    global); layers with equal tables can share the cos/sin gathered for one forward pass. The
    comparison is made once per table object (again after a layer extends its tables)."""
    cos, sin = attn.rotary_cos, attn.rotary_sin
    seen = attn.__dict__.get("_tlx_rotary")
    if seen is not None and seen[0] is cos and seen[1] is sin:
        return seen[2]
    for i, (c, s) in enumerate(memo.rotary_tables):
        if (
            c is cos
            and s is sin
            or (
                c.shape == cos.shape
                and c.dtype == cos.dtype
                and c.device == cos.device
                and s.shape == sin.shape
                and torch.equal(c, cos)
                and torch.equal(s, sin)
            )
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
def rotary_tables(
    memo: ForwardMemo,
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
        positions = (attention_mask.cumsum(dim=1) - 1).clamp_(min=0)  # pads: position 0
        if positions.device != cos_table.device:
            positions = positions.to(cos_table.device)
        cos_k = cos_table[positions, None, :]
        sin_k = sin_table[positions, None, :]
    return memo.put(name, (cos_k[:, offset:], sin_k[:, offset:], cos_k, sin_k))


@no_type_check
def causal_mask(
    memo: ForwardMemo,
    attention_mask: Tensor | None,
    offset: int,
    n_queries: int,
    n_keys: int,
    window: int | None,
    group: int,
    device: torch.device,
) -> tuple[Tensor, Tensor | None]:
    """The boolean mask [batch|1, 1, pos, kv_pos] of ``AbstractAttention.apply_causal_mask``,
    on ``device`` (the queries'), the same mask with its query rows repeated ``group`` times
    ([., 1, group*pos, kv_pos], for grouped queries), and the rows with no key at all in that
    layout: None without an attention mask (a query always sees its own key), else a tensor
    whether or not any row is empty (asking would make the host wait for the device)."""
    name = ("mask", window, group)
    hit = memo.get(attention_mask, (offset, n_keys), name)
    if hit is not None:
        return hit
    query_pos = torch.arange(offset, offset + n_queries, device=device)
    key_pos = torch.arange(n_keys, device=device)
    mask = key_pos <= query_pos[:, None]
    if window is not None:
        mask = mask & (key_pos > query_pos[:, None] - window)
    if attention_mask is not None:
        mask = mask & attention_mask.bool().reshape(-1, 1, 1, n_keys)
    else:
        mask = mask.view(1, 1, n_queries, n_keys)
    grouped = mask.repeat(1, 1, group, 1) if group > 1 else mask
    empty = None if attention_mask is None else ~grouped.any(dim=-1, keepdim=True)
    return memo.put(name, (grouped, empty))


@no_type_check
def append_kv(
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
def rotated_keys(
    entry: TransformerLensKeyValueCacheEntry,
    past_before: Tensor,
    keys: Tensor,
    fresh: tuple[Tensor, Tensor, Tensor],
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
    (``past_before`` is what ``past_keys`` was before this step's append). ``fresh``: the
    appended keys and their cos/sin (the queries' tables: they share positions), so rotating
    them slices nothing."""
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
        buf[:, :n_keys] = rotate(keys, cos_k, sin_k, rotary_dim, adjacent)
    else:
        buf[:, n_old:n_keys] = rotate(*fresh, rotary_dim, adjacent)
    entry.__dict__["_tlx_krot"] = (buf, entry.past_keys)
    return buf[:, :n_keys]


@no_type_check
def rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, adjacent: bool) -> Tensor:
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
