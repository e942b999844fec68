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

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.components import (
    Attention,
    GroupedQueryAttention,
    RMSNorm,
    TransformerBlock,
    Unembed,
)
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from tlextract.model.attention import FastAttention, FastGroupedQueryAttention
from tlextract.model.fused import FusedLinear, no_type_check, packed_weights
from tlextract.model.hooks import is_hooked, keep_name, run_hook
from tlextract.model.kv import ForwardMemo

log = logging.getLogger(__name__)


# --- components ---


@keep_name
@no_type_check
class _FastRMSNorm(RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        scale = run_hook(self.hook_scale, (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = run_hook(self.hook_normalized, x / scale).to(self.cfg.dtype)
        return x * self.w


@keep_name
@no_type_check
class _FastGatedMLP(GatedMLP):
    _tlx_gate_up: FusedLinear
    _tlx_out: FusedLinear

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.is_layer_norm_activation():
            return super().forward(x)
        gate_up: FusedLinear = self._tlx_gate_up
        out = gate_up(x)
        pre_act = run_hook(self.hook_pre, out[..., gate_up.rows(0)])
        pre_linear = run_hook(self.hook_pre_linear, out[..., gate_up.rows(1)])
        post_act = run_hook(self.hook_post, self.act_fn(pre_act) * pre_linear + self.b_in)
        return self._tlx_out(post_act)


@keep_name
@no_type_check
class _FastUnembed(Unembed):
    _tlx_out: FusedLinear

    def forward(self, residual: Tensor) -> Tensor:
        residual = run_hook(self.hook_in, residual)
        return run_hook(self.hook_out, self._tlx_out(residual))


@keep_name
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
        resid_pre = run_hook(self.hook_resid_pre, resid_pre)
        ln1_hooked = is_hooked(self.ln1) or any(
            h is not None and is_hooked(h) for h in self.ln1._modules.values()
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
        attn_out = run_hook(self.hook_attn_out, attn_out)
        resid_mid = run_hook(self.hook_resid_mid, resid_pre + attn_out)
        mlp_in = resid_mid if not cfg.use_hook_mlp_in else self.hook_mlp_in(resid_mid.clone())
        mlp_out = self.mlp(self.ln2(mlp_in))
        if cfg.use_normalization_before_and_after:
            mlp_out = self.ln2_post(mlp_out)
        mlp_out = run_hook(self.hook_mlp_out, mlp_out)
        return run_hook(self.hook_resid_post, resid_mid + mlp_out)


_FAST_ATTENTION = (FastAttention, FastGroupedQueryAttention)


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
    Attention: FastAttention,
    GroupedQueryAttention: FastGroupedQueryAttention,
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
        memo = ForwardMemo()
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
