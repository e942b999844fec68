"""What a trait vector means in tokens: the logit lens of one direction, read through the
model's own final norm and unembedding."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tlextract.errors import TLExtractError
from tlextract.model.decoding import Model
from tlextract.model.tokens import tokenizer_of
from tlextract.ops.trait_vectors import TraitVectors

# (token id, decoded text, logit)
TokenLogit = tuple[int, str, float]


@dataclass(frozen=True)
class VectorTokens:
    """The ``k`` tokens a direction raises most (``promoted``, highest logit first) and lowers
    most (``suppressed``, lowest first). ``trait`` and ``method`` are None for a plain tensor."""

    trait: str | None
    method: str | None
    layer: int
    promoted: list[TokenLogit]
    suppressed: list[TokenLogit]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def direction_logits(model: Model, vector: Float[Tensor, " d_model"]) -> Float[Tensor, " vocab"]:
    """``vector`` through ``model.ln_final`` as a residual would go (RMSNorm: a positive
    rescale times the norm weight; LayerNorm: centred as well), then through ``W_U``, float32.

    Offsets are left out, since a direction has none: the unembedding bias ``b_U`` and a
    LayerNorm's bias (``ln_final`` of a zero residual) add the same to every residual's
    logits. The logit soft-cap (Gemma 2) is not applied either: it is monotone, so the order
    is the same, and the values stay linear in the normed direction."""
    if vector.shape != (model.cfg.d_model,):
        raise TLExtractError(
            f"vector_tokens: a vector of shape {tuple(vector.shape)}; the model's residual "
            f"is ({model.cfg.d_model},)"
        )
    w_u = model.W_U
    v = vector.to(device=w_u.device, dtype=w_u.dtype)[None, None]
    normed = model.ln_final(v) - model.ln_final(torch.zeros_like(v))
    return (normed[0, 0] @ w_u).float()


def vector_tokens(
    model: Model,
    vectors: TraitVectors | Float[Tensor, " d_model"],
    layer: int,
    k: int = 10,
) -> VectorTokens:
    """The logit lens of ``vectors`` at ``layer`` (a ``TraitVectors``' vector of that block, or
    a plain direction, for which ``layer`` is only recorded): the ``k`` tokens it promotes and
    the ``k`` it suppresses, with their logits (:func:`direction_logits`) and decoded text.

    The lens reads any block's direction as if it reached the final norm unchanged: a
    description of the direction, not of what steering with it at ``layer`` does."""
    trait: str | None = None
    method: str | None = None
    if isinstance(vectors, TraitVectors):
        if layer not in vectors.layers:
            raise TLExtractError(
                f"vector_tokens: {vectors.trait} has no {vectors.method} vector for layer "
                f"{layer}; it has {list(vectors.layers)}"
            )
        trait, method, vectors = vectors.trait, vectors.method, vectors[layer]
    logits = direction_logits(model, vectors)
    if not 1 <= k <= logits.numel():
        raise TLExtractError(f"vector_tokens: k={k}; use 1 to {logits.numel()} (the vocabulary)")
    tokenizer = tokenizer_of(model)

    def listed(values: Tensor, ids: Tensor) -> list[TokenLogit]:
        texts = tokenizer.batch_decode([[i] for i in ids.tolist()])
        return list(zip(ids.tolist(), texts, values.tolist(), strict=True))

    top, bottom = logits.topk(k), logits.topk(k, largest=False)
    return VectorTokens(trait, method, layer, listed(*top), listed(*bottom))
