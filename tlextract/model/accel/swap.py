"""Faster CPU inference for a HookedTransformer, with every hook point kept.

TransformerLens 3.9 rebuilds weights on every forward pass: ``Unembed`` and ``GatedMLP`` call
``W.T.contiguous()`` (a full copy of each matrix, the 113 MB unembedding included, for a single
decode step), attention rearranges ``W_Q/W_K/W_V/W_O`` with einops into fresh contiguous copies,
rotary embeddings clone and scatter the keys and gather the sin/cos tables in every layer, and
grouped-query attention ``repeat_interleave``-s the whole key/value cache. On a CPU that copying,
not the arithmetic, is most of the time.

:func:`accelerate` swaps the class of the supported components for a subclass whose ``forward``
computes the same values from TransformerLens' own parameters, read through views (no copy, no
second set of weights, so edits of the weights are seen at once; :func:`restore` swaps them back
and gives the parameters their own storage again):

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
types) runs TransformerLens' own code, and so does every component when the installed
TransformerLens or torch is not a tested one, or a component is not what its fast forward
expects (guard.py; one warning says so).
"""

from __future__ import annotations

import functools
import logging
from contextlib import AbstractContextManager

from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.components import (
    Attention,
    GroupedQueryAttention,
    RMSNorm,
    TransformerBlock,
    Unembed,
)
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.model_bridge import TransformerBridge

from tlextract.errors import TLExtractError
from tlextract.model.accel.attention import FastAttention, FastGroupedQueryAttention
from tlextract.model.accel.components import (
    _FastGatedMLP,
    _FastRMSNorm,
    _FastTransformerBlock,
    _FastUnembed,
)
from tlextract.model.accel.fused import FusedLinear, packed_weights
from tlextract.model.accel.guard import mismatch, warn_once
from tlextract.model.accel.kv import ForwardMemo
from tlextract.model.accel.selfcheck import release_problem

log = logging.getLogger(__name__)

_FAST_ATTENTION = (FastAttention, FastGroupedQueryAttention)
_FAST_CLASSES: dict[type, type] = {
    TransformerBlock: _FastTransformerBlock,
    Attention: FastAttention,
    GroupedQueryAttention: FastGroupedQueryAttention,
    RMSNorm: _FastRMSNorm,
    GatedMLP: _FastGatedMLP,
    Unembed: _FastUnembed,
}
_PREFIX = "_tlx_"  # every attribute accelerate() stores on a TransformerLens object


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


def accelerate(
    model: HookedTransformer | TransformerBridge, *, sdpa: bool = True, untested: bool = False
) -> HookedTransformer:
    """Make ``model``'s forward passes fast, in place; returns ``model``. :func:`restore` undoes it.

    Components of exactly the types listed in the module docstring get a faster ``forward``;
    everything else is left as is. Idempotent (a second call only updates ``sdpa``). Hooks, hook
    names, parameters and the state dict are unchanged. Nothing outside the model changes (the
    process-wide malloc setting is :func:`tlextract.model.accel.keep_freed_memory`'s).

    ``sdpa``: compute attention with ``F.scaled_dot_product_attention`` whenever nothing is
    hooked on ``hook_attn_scores``/``hook_pattern`` and scores are not soft-capped (3x faster
    attention on long prompts, no [batch, head, pos, pos] tensors; logits then differ from
    TransformerLens' by float32 rounding, about 1e-4 on logits of size 30). With ``sdpa=False``
    attention runs TransformerLens' explicit operations and outputs are bitwise equal on CPU.

    On a TransformerLens or torch release the accelerator was not tested with (guard.TESTED) a
    self-check on a tiny model like this one decides (selfcheck.py): accelerated when it agrees,
    else one warning and nothing changed, unless ``untested`` (the user's risk: the numbers are
    then unchecked). A component that does not match what its fast forward expects (see
    guard.py) stays stock, with one warning for the whole model. A TransformerBridge runs
    transformers' own forward, which this cannot speed up: TLExtractError."""
    if isinstance(model, TransformerBridge):
        raise TLExtractError(
            f"{model.cfg.model_name}: a TransformerBridge runs transformers' own forward pass; "
            "accelerate applies to a HookedTransformer only (leave the bridge as it is)"
        )
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"accelerate expects a HookedTransformer, got {type(model).__name__}")
    if model.cfg.n_devices != 1:
        log.info("accelerate: model spread over %d devices, left as is", model.cfg.n_devices)
        return model
    check = functools.partial(accelerate, sdpa=sdpa, untested=True)
    problem = None if untested else release_problem(model.cfg, check)
    if problem is not None:
        warn_once(problem)
        return model
    memo = model.__dict__.get("_tlx_memo")
    if memo is None:
        memo = ForwardMemo()
        model.__dict__["_tlx_memo"] = memo
        model.__dict__["_tlx_reset"] = model.register_forward_pre_hook(memo.reset)
    memo.sdpa = sdpa
    refused = _swap(model, memo)
    model.__dict__["_tlx_fused"] = [
        f for m in model.modules() for f in m.__dict__.values() if isinstance(f, FusedLinear)
    ]
    if refused:
        log.warning(
            "accelerate: components left as TransformerLens runs them, as they are not what the "
            "fast path was written for: %s",
            "; ".join(f"{', '.join(names)} ({why})" for why, names in refused.items()),
        )
    return model


def _swap(model: HookedTransformer, memo: ForwardMemo) -> dict[str, list[str]]:
    """Swap in the fast class of every component that fits it; returns the components refused
    (names by reason)."""
    swapped: dict[str, int] = {}
    refused: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        fast = _FAST_CLASSES.get(type(module))
        if fast is None:
            continue
        reason = mismatch(module, fast)
        if reason is not None:
            refused.setdefault(f"{type(module).__name__}: {reason}", []).append(name)
            continue
        supported = getattr(fast, "_tlx_supported", None)
        if supported is not None and not supported(module):
            continue  # a configuration the fast forward does not cover: TransformerLens runs it
        module.__class__ = fast
        if isinstance(module, _FAST_ATTENTION):
            module.__dict__["_tlx_memo"] = memo
        _fuse(module)
        swapped[type(module).__name__] = swapped.get(type(module).__name__, 0) + 1
    if swapped:
        log.debug("accelerate: %s", ", ".join(f"{n} {k}" for k, n in sorted(swapped.items())))
    return refused


def restore(model: HookedTransformer | TransformerBridge) -> HookedTransformer | TransformerBridge:
    """Undo :func:`accelerate` in place; returns ``model``.

    Every component gets its TransformerLens class back and every parameter storage of its own
    (contiguous, the same values, the same ``Parameter`` objects), the forward pre-hook and
    every ``_tlx_`` attribute go: the model then computes exactly what a freshly loaded stock
    model computes. A model that was never accelerated is left as is. Key/value caches filled
    while accelerated stay usable. The process-wide malloc setting stays (glibc cannot undo it).
    A TransformerBridge is never accelerated: left as is."""
    if isinstance(model, TransformerBridge):
        return model
    handle = model.__dict__.get("_tlx_reset")
    if handle is not None:
        handle.remove()
    for module in model.modules():
        for fused in module.__dict__.values():
            if isinstance(fused, FusedLinear):
                fused.release()
        for key in [k for k in module.__dict__ if k.startswith(_PREFIX)]:
            del module.__dict__[key]
        base = getattr(type(module), "_tlx_base", None)
        if base is not None:
            module.__class__ = base
    return model


def is_accelerated(model: nn.Module) -> bool:
    """Whether any component of ``model`` runs a fast forward."""
    return any(hasattr(type(m), "_tlx_base") for m in model.modules())


def decode_session(model: nn.Module) -> AbstractContextManager[None]:
    """Context for many forward passes with fixed weights (a generation): an accelerated model's
    products use oneDNN's packed weights inside (see fused.packed_weights); any other model runs
    as it is."""
    return packed_weights(model.__dict__.get("_tlx_fused", ()))
