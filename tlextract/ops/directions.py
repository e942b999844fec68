"""What every extraction method shares: input checks, the working dtype, and the sign and norm
conventions (see :mod:`tlextract.ops.methods`); ``mean_diff`` is the reference direction."""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from jaxtyping import Float
from torch import Tensor

from tlextract.errors import TLExtractError


def mean_diff(
    pos: Float[Tensor, "n_pos layer d_model"],
    neg: Float[Tensor, "n_neg layer d_model"],
    *,
    seed: int = 0,
) -> Float[Tensor, "layer d_model"]:
    """Mean of the positive activations minus mean of the negative ones, per layer, in float32.
    Deterministic; ``seed`` is unused (every method takes it: see :mod:`tlextract.ops.methods`)."""
    return pos.float().mean(dim=0) - neg.float().mean(dim=0)


def work_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def check_inputs(
    pos: Float[Tensor, "n_pos layer d_model"], neg: Float[Tensor, "n_neg layer d_model"], name: str
) -> None:
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise TLExtractError(
            f"{name}: needs at least one positive and one negative example per layer "
            f"(got {pos.shape[0]} positive, {neg.shape[0]} negative)."
        )
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise TLExtractError(
            f"{name}: the activations contain NaN or inf; re-cache them (a half-precision "
            "overflow is the usual cause: cache in float32)."
        )


def stack_layers(
    pos: Float[Tensor, "n_pos layer d_model"], neg: Float[Tensor, "n_neg layer d_model"]
) -> Float[Tensor, "layer n d_model"]:
    """Positives then negatives, layer-major, in the working dtype."""
    both = torch.cat([pos, neg]).to(work_dtype(pos))
    return rearrange(both, "n layer d_model -> layer n d_model")


def unit_rows(v: Float[Tensor, "layer d_model"]) -> Float[Tensor, "layer d_model"]:
    """Rows scaled to unit norm; an all-zero row stays zero."""
    norm = v.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, v / norm.clamp_min(torch.finfo(v.dtype).tiny), 0.0)


def finish_direction(
    direction: Float[Tensor, "layer d_model"],
    pos: Float[Tensor, "n_pos layer d_model"],
    neg: Float[Tensor, "n_neg layer d_model"],
) -> Float[Tensor, "layer d_model"]:
    """Flip each row so that positives project higher on average; unit norm; float32."""
    reference = mean_diff(pos, neg).to(direction.dtype)
    agree = reduce(direction * reference, "layer d_model -> layer 1", "sum")
    signed = torch.where(agree < 0, -direction, direction)
    return unit_rows(signed).float().nan_to_num(0.0, 0.0, 0.0)


def thin_svd(
    x: Float[Tensor, "layer n d_model"],
) -> tuple[Float[Tensor, "layer n r"], Float[Tensor, "layer r"], Float[Tensor, "layer r d_model"]]:
    """``x = u @ diag(s) @ vh`` with ``r = min(n, d_model)``, singular values descending.

    Computed from the eigendecomposition of the smaller Gram matrix, several times faster than
    ``torch.linalg.svd`` on the wide matrices activations give (n examples << d_model), and
    accurate for the leading components, which is what the callers use. Singular values below
    ``sqrt(eps) * s_max`` are set to 0 and their rows of ``vh`` (or columns of ``u``) to zero.
    """
    wide = x.shape[1] <= x.shape[2]
    a = x if wide else x.transpose(-1, -2)  # [layer, small, big]
    evals, vecs = torch.linalg.eigh(a @ a.transpose(-1, -2))
    evals, vecs = evals.flip(-1), vecs.flip(-1)  # descending
    s = evals.clamp_min(0).sqrt()
    keep = s > s[:, :1] * torch.finfo(x.dtype).eps ** 0.5
    s = torch.where(keep, s, 0.0)
    inv = torch.where(keep, 1 / torch.where(keep, s, 1.0), 0.0)
    other = (vecs * inv[:, None, :]).transpose(-1, -2) @ a  # [layer, r, big]
    if wide:
        return vecs, s, other
    return other.transpose(-1, -2), s, vecs.transpose(-1, -2)
