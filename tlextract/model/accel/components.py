"""The fast forwards of TransformerLens' norm, gated MLP, unembedding and block (attention is in
attention.py): the same values from the same parameters, without TransformerLens' per-call weight
copies, and each with what it expects of its component (``_tlx_expects``, checked by guard.py
before a component is swapped)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.components import RMSNorm, TransformerBlock, Unembed
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from tlextract.model.accel.fused import FusedLinear, no_type_check
from tlextract.model.accel.guard import Expects
from tlextract.model.accel.hooks import is_hooked, keep_name, run_hook


@keep_name
@no_type_check
class _FastRMSNorm(RMSNorm):
    @staticmethod
    def _tlx_expects(cfg: Any) -> Expects:
        return Expects(attrs=("w", "eps", "hook_scale", "hook_normalized"), cfg=("dtype",))

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

    @staticmethod
    def _tlx_expects(cfg: Any) -> Expects:
        w_in = ("d_model", "d_mlp")
        return Expects(
            params={"W_gate": w_in, "W_in": w_in, "W_out": ("d_mlp", "d_model"),
                    "b_in": ("d_mlp",), "b_out": ("d_model",)},
            attrs=("act_fn", "hook_pre", "hook_pre_linear", "hook_post"),
            cfg=("is_layer_norm_activation",),
        )  # fmt: skip

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

    @staticmethod
    def _tlx_expects(cfg: Any) -> Expects:
        return Expects(
            params={"W_U": ("d_model", "d_vocab_out"), "b_U": ("d_vocab_out",)},
            attrs=("hook_in", "hook_out"),
        )

    def forward(self, residual: Tensor) -> Tensor:
        residual = run_hook(self.hook_in, residual)
        return run_hook(self.hook_out, self._tlx_out(residual))


# The configuration fields that decide whether the fast block forward covers a block.
_BLOCK_DECIDES = ("attn_only", "parallel_attn_mlp", "original_architecture", "n_devices")


def _block_covered(cfg: Any) -> bool:
    """Pre-norm, attention then MLP, on one device. Parallel blocks (NeoX, Phi, GPT-J),
    attention-only and post-norm models stay TransformerLens' (their attention and norms are
    still accelerated)."""
    return (
        not cfg.attn_only
        and not cfg.parallel_attn_mlp
        and cfg.original_architecture not in POST_NORM_ARCHITECTURES
        and cfg.n_devices == 1
    )


@keep_name
@no_type_check
class _FastTransformerBlock(TransformerBlock):
    """Pre-norm block, attention then MLP; ``ln1`` runs once for Q, K and V unless hooked."""

    @staticmethod
    def _tlx_expects(cfg: Any) -> Expects:
        if not all(hasattr(cfg, a) for a in _BLOCK_DECIDES) or not _block_covered(cfg):
            # Left stock by design (_tlx_supported): only the deciding fields are read, so a
            # parallel block's missing hook_resid_mid is no mismatch to warn about.
            return Expects(cfg=_BLOCK_DECIDES)
        around = getattr(cfg, "use_normalization_before_and_after", False)
        post = ("ln1_post", "ln2_post") if around else ()
        hooks = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
        return Expects(
            attrs=("ln1", "attn", "ln2", "mlp", *post, *(f"hook_{h}" for h in hooks)),
            cfg=(*_BLOCK_DECIDES, "use_attn_in", "use_split_qkv_input",
                 "use_normalization_before_and_after", "use_hook_mlp_in"),
        )  # fmt: skip

    def _tlx_supported(self) -> bool:
        return _block_covered(self.cfg)

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
