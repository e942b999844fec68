"""A model against another of its family (a fine-tune, a LoRA adapter merged, a checkpoint):
the same prompt and response tokens teacher-forced through both, and how far each trait's
projection moved, per layer and per response token.

The shift of a token at a layer is ``(r_other - r_base) . u``: the residual difference at the
hook, on the trait's unit vector ``u`` at that layer. A response's shift is its tokens' mean
(prompt tokens are left out, as when vectors are extracted); a layer's shift is the responses'
mean, with a bootstrap interval over responses (:func:`tlextract.ops.bootstrap.mean_interval`).
The raw residual difference, each response's mean over its tokens, is kept too: it is what a
change of weights did, whatever direction one reads it along.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor

from tlextract.model.decoding import Model, teacher_forced
from tlextract.model.tokens import device_of, tokenizer_of
from tlextract.ops.bootstrap import Interval, mean_interval
from tlextract.ops.pool import hook_name, pack
from tlextract.ops.trait_vectors import TraitVectors

Vectors = TraitVectors | Mapping[str, TraitVectors]


@dataclass(frozen=True)
class Comparison:
    """Per response ``i`` (``prompt_ids[i]`` + ``response_ids[i]``, empty responses left out):
    ``residual_shift[i, l]``, the mean over its response tokens of ``other - base`` at
    ``hook_names[l]``, and per trait ``token_shift[trait][i]``, each response token's shift on
    the trait's unit vector, ``[token, layer]``."""

    base: str
    other: str
    hook: str
    layers: tuple[int, ...]
    rows: tuple[int, ...]  # which of the given responses each row is
    units: dict[str, Float[Tensor, "layer d_model"]]
    residual_shift: Float[Tensor, "row layer d_model"]
    token_shift: dict[str, list[Float[Tensor, "_token layer"]]]

    @property
    def hook_names(self) -> list[str]:
        return [hook_name(self.hook, layer) for layer in self.layers]

    @property
    def traits(self) -> tuple[str, ...]:
        return tuple(self.units)

    def shift(self, trait: str) -> Float[Tensor, "row layer"]:
        """Each response's mean shift on ``trait``'s unit vector, per layer."""
        return einsum(self.residual_shift, self.units[trait], "row l d, l d -> row l")

    def intervals(self, trait: str, n_boot: int = 2000, seed: int = 0) -> list[Interval]:
        """Per layer, the mean shift over responses with its 95% bootstrap interval."""
        shift = self.shift(trait)
        return [mean_interval(shift[:, i].tolist(), n_boot, seed) for i in range(len(self.layers))]


def as_mapping(vectors: Vectors) -> dict[str, TraitVectors]:
    return {vectors.trait: vectors} if isinstance(vectors, TraitVectors) else dict(vectors)


@torch.inference_mode()
def shift_batch(
    base: Model,
    other: Model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    names: Sequence[str],
    units: Float[Tensor, "trait layer d_model"],
) -> list[tuple[Float[Tensor, "layer d_model"], Float[Tensor, "_token layer trait"]]]:
    """One teacher-forced pass of each model over the same tokens: per response, the mean
    residual difference over its response tokens, and each response token's shift on each
    unit vector (float32, CPU)."""
    pad = tokenizer_of(base).pad_token_id
    tokens, attn, response = pack(prompt_ids, response_ids, pad, device_of(base))
    _, a = teacher_forced(base, tokens, attn, names)
    moved = (tokens.to(device_of(other)), attn.to(device_of(other)))
    _, b = teacher_forced(other, *moved, names)
    diff = torch.stack([b[n].float().to(a[n].device) - a[n].float() for n in names], dim=2)
    per_token = einsum(diff, units.to(diff.device), "b p l d, t l d -> b p l t")
    out = []
    for row, proj, mask in zip(diff, per_token, response, strict=True):
        out.append((row[mask].mean(0).cpu(), proj[mask].cpu()))
    return out
