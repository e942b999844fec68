"""The accelerator on a torch or TransformerLens release it was not tested with (guard.TESTED).

Instead of running stock there, :func:`release_problem` checks the release on the model at hand:
a 2-layer copy of the model's configuration with tiny dimensions and seeded random weights, in
the model's dtype and on its device (and in float32, where bf16's rounding would hide a subtle
error), run stock and accelerated. Logits at real (unpadded)
positions, every block's residual stream, the logits of KV-cached decode steps and the greedy
tokens (where the stock top-2 margin is wider than the tolerance) must agree within
:func:`tolerance`. The verdict is kept per architecture, dtype and device for the process: the
check runs once (tens of milliseconds on a CPU) and a failure is one warning naming the versions
and what differed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from tlextract.model.accel.guard import untested_versions
from tlextract.model.fixes import moe_in_model_dtype

log = logging.getLogger(__name__)

# What decides which code paths a model takes, beside its architecture name and dtype.
_PATHS = ("normalization_type", "positional_embedding_type", "gated_mlp", "act_fn",
          "n_key_value_heads", "use_local_attn", "attn_scores_soft_cap", "output_logits_soft_cap",
          "use_qk_norm", "use_normalization_before_and_after", "parallel_attn_mlp",
          "num_experts", "rotary_adjacent_pairs", "final_rms")  # fmt: skip
_verdicts: dict[tuple[Any, ...], str | None] = {}  # key -> what differed, None if it agreed
_DECODE_STEPS = 3


def tolerance(dtype: torch.dtype) -> float:
    """Largest accepted |accelerated - stock|, relative to the stock tensor's largest magnitude.

    Both compute the same operations but round in other places (fused products, another
    summation order): ~12 rounded operations over the 2 layers, each off by at most the unit
    roundoff u (half the dtype's eps: 2^-8 in bfloat16, 2^-24 in float32); 32u for bf16 (up to
    8u measured on tiny models), at least 1e-4 (the float32 suites' bound, which covers SDPA's
    other summation order). A fast path that is wrong (mask, rotary, a bias, a norm) moves
    values by their own size."""
    return max(32 * torch.finfo(dtype).eps / 2, 1e-4)


def release_problem(
    cfg: HookedTransformerConfig, accelerate_untested: Callable[[HookedTransformer], object]
) -> str | None:
    """None when the installed releases are tested ones, or when the self-check on a tiny model
    like ``cfg``'s agrees (``accelerate_untested`` accelerates a model in place, bypassing this
    guard); else the warning to give (the versions and what differed)."""
    versions = untested_versions()
    if not versions:
        return None
    key = (cfg.original_architecture, cfg.dtype, torch.device(cfg.device or "cpu").type,
           *(getattr(cfg, name, None) for name in _PATHS))  # fmt: skip
    if key not in _verdicts:
        tiny = _tiny_config(cfg)
        # Half precision hides a subtly wrong fast path within its rounding: float32 too.
        in_fp32 = HookedTransformerConfig(**{**tiny.to_dict(), "dtype": torch.float32})
        threads = torch.get_num_threads()
        # Tiny tensors: intra-op threads only add synchronisation (~0.1 s on one thread,
        # seconds with two on a busy 2-core machine).
        torch.set_num_threads(1)
        try:
            _verdicts[key] = _self_check(tiny, accelerate_untested) or (
                None if cfg.dtype == torch.float32 else _self_check(in_fp32, accelerate_untested)
            )
        finally:
            torch.set_num_threads(threads)
        if _verdicts[key] is None:
            log.info("accelerator self-check on %s: agrees for %s in %s", "; ".join(versions),
                     cfg.original_architecture or "this architecture",
                     str(cfg.dtype).removeprefix("torch."))  # fmt: skip
    differed = _verdicts[key]
    if differed is None:
        return None
    return (
        f"tlextract's accelerator was not tested with {'; '.join(versions)}, and its self-check "
        f"on a tiny {cfg.original_architecture or 'model like this one'} in "
        f"{str(cfg.dtype).removeprefix('torch.')} differed ({differed}): models are left as "
        "TransformerLens runs them (same numbers, slower); tlextract.accelerate(model, "
        "untested=True) overrides this"
    )


def _tiny_config(cfg: HookedTransformerConfig) -> HookedTransformerConfig:
    """``cfg`` with 2 layers and tiny dimensions; grouped-query, partial rotary, local windows
    and experts are kept (smaller)."""
    kv = cfg.n_key_value_heads
    tiny_kv = None if kv is None else 4 if kv == cfg.n_heads else 1 if kv == 1 else 2
    partial = cfg.rotary_dim is not None and cfg.rotary_dim < cfg.d_head
    types = cfg.attn_types
    experts = cfg.num_experts
    return HookedTransformerConfig(**{
        **cfg.to_dict(), "n_layers": 2, "d_model": 32, "d_head": 8, "n_heads": 4,
        "n_key_value_heads": tiny_kv, "d_mlp": 64, "d_vocab": 64, "d_vocab_out": 64,
        "n_ctx": 32, "rotary_dim": 4 if partial else 8, "n_devices": 1, "seed": 0,
        "attn_types": None if types is None else (list(types) * 2)[:2],
        "window_size": None if cfg.window_size is None else min(cfg.window_size, 4),
        "num_experts": None if experts is None else min(experts, 4),
        "experts_per_token": None if experts is None else min(cfg.experts_per_token or 1, 2),
        "n_params": None, "tokenizer_name": None, "model_name": "tlextract-self-check",
        # no numbers on the meta device: check the same code on the CPU
        "device": "cpu" if torch.device(cfg.device or "cpu").type == "meta" else cfg.device,
    })  # fmt: skip


def _tiny_model(cfg: HookedTransformerConfig) -> HookedTransformer:
    """Seeded random weights of the sizes real weights have (norm weights near 1)."""
    model = moe_in_model_dtype(HookedTransformer(cfg, move_to_device=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = name.endswith(".w")
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if norm else 0.3) + float(norm))
    return model.eval()


def _self_check(
    cfg: HookedTransformerConfig, accelerate_untested: Callable[[HookedTransformer], object]
) -> str | None:
    stock = _tiny_model(cfg)
    fast = copy.deepcopy(stock)
    accelerate_untested(fast)
    device = next(stock.parameters()).device
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.d_vocab, (2, 7), generator=gen).to(device)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # the second prompt is left-padded
    with torch.inference_mode():
        ref, fed = _outputs(stock, tokens, mask, None)
        got, _ = _outputs(fast, tokens, mask, fed)
    tol = tolerance(cfg.dtype)
    for name, expected in ref.items():
        diff = _rel_diff(expected, got[name])
        if not diff <= tol:  # NaN differs too
            return (f"{name} in {str(cfg.dtype).removeprefix('torch.')} off by {diff:.3g} of its "
                    f"largest magnitude, tolerance {tol:.3g}")  # fmt: skip
    return _greedy_difference(ref["decode logits"], got["decode logits"], tol)


def _outputs(
    model: HookedTransformer, tokens: Tensor, mask: Tensor, fed: Tensor | None
) -> tuple[dict[str, Tensor], Tensor]:
    """Logits and residuals at real positions, then the logits of KV-cached decode steps fed
    ``fed`` (the stock model's greedy tokens, so both models see the same inputs; None: this
    model's own greedy tokens, returned)."""
    real = mask.bool()
    logits, cache = model.run_with_cache(
        tokens, attention_mask=mask, names_filter=lambda n: n.endswith("hook_resid_post")
    )
    out = {"logits": logits[real], **{n: t[real] for n, t in cache.items()}}
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, tokens.device, tokens.shape[0])
    steps = [model(tokens, attention_mask=mask, past_kv_cache=kv)[:, -1]]
    chosen = []
    for t in range(_DECODE_STEPS):
        new = steps[-1].argmax(-1, keepdim=True) if fed is None else fed[:, t : t + 1]
        chosen.append(new)
        steps.append(model(new, attention_mask=torch.ones_like(new), past_kv_cache=kv)[:, -1])
    out["decode logits"] = torch.stack(steps, dim=1)
    return out, torch.cat(chosen, dim=1)


def _rel_diff(ref: Tensor, got: Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _greedy_difference(ref: Tensor, got: Tensor, tol: float) -> str | None:
    """Where the greedy token differs though the stock top-2 margin exceeds 2 tolerances."""
    ref, got = ref.double(), got.double()
    top2 = ref.topk(2, dim=-1).values
    sure = (top2[..., 0] - top2[..., 1]) > 2 * tol * ref.abs().max()
    wrong = sure & (ref.argmax(-1) != got.argmax(-1))
    if bool(wrong.any()):
        row, step = (int(i) for i in torch.nonzero(wrong)[0])
        return f"greedy token of prompt {row} at decode step {step}"
    return None
