"""Repairs applied to a HookedTransformer after loading, for what TransformerLens 3.9 builds
otherwise than its own configuration says."""

from __future__ import annotations

from transformer_lens import HookedTransformer
from transformer_lens.components.mlps.moe import MoE


def moe_in_model_dtype(model: HookedTransformer) -> HookedTransformer:
    """Put every mixture-of-experts MLP (Mixtral, OLMoE) in the model's dtype, in place.

    TransformerLens 3.9 builds the router and the experts as ``nn.Linear`` without the config's
    dtype, so they stay float32 in a bfloat16 model, and loading the weights keeps them so; the
    first forward pass then fails ("expected m1 and m2 to have the same dtype"). The values
    were loaded from weights of the model's dtype, so the cast loses nothing."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.to(model.cfg.dtype)
    return model
