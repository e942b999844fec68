"""Unsupervised directions whose sign the class means fix: the top principal component of the
paired differences, uncentred (``pca_uncentered``, repeng's ``pca_center``) or centred
(``pca_centered``, repeng's ``pca_diff``), and the most class-separating independent component
(``ica``)."""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor

from tlextract.ops.directions import (
    check_inputs,
    finish_direction,
    stack_layers,
    thin_svd,
    work_dtype,
)


def _separation(scores: Float[Tensor, "layer n comp"], n_pos: int) -> Float[Tensor, "layer comp"]:
    """|mean gap| / pooled within-class std of each column of ``scores`` (first ``n_pos`` rows are
    positives). Used only to rank candidate components; finite for any input."""
    p, q = scores[:, :n_pos], scores[:, n_pos:]
    gap = p.mean(dim=1) - q.mean(dim=1)
    within = (p - p.mean(dim=1, keepdim=True)).pow(2).sum(dim=1) + (
        q - q.mean(dim=1, keepdim=True)
    ).pow(2).sum(dim=1)
    dof = max(scores.shape[1] - 2, 1)
    return gap.abs() / (within / dof + torch.finfo(scores.dtype).eps).sqrt()


# ---------------------------------------------------------------------------------------------
# principal components of the paired differences


def _top_difference_component(
    pos: Float[Tensor, "n_pos layer d_model"],
    neg: Float[Tensor, "n_neg layer d_model"],
    *,
    center: bool,
    name: str,
) -> Float[Tensor, "layer d_model"]:
    """Top right-singular vector of the paired differences (centred on their mean or not)."""
    check_inputs(pos, neg, name)
    m = min(pos.shape[0], neg.shape[0])
    diffs = pos[:m].to(work_dtype(pos)) - neg[:m].to(work_dtype(pos))
    x = rearrange(diffs, "pair layer d_model -> layer pair d_model")
    if center:
        x = x - x.mean(dim=1, keepdim=True)
    vh = thin_svd(x)[2]
    return finish_direction(vh[:, 0, :], pos, neg)


def pca_uncentered(
    pos: Float[Tensor, "n_pos layer d_model"],
    neg: Float[Tensor, "n_neg layer d_model"],
    *,
    seed: int = 0,
) -> Float[Tensor, "layer d_model"]:
    """Top right-singular vector of the *uncentred* paired differences ``pos[i] - neg[i]``.

    The direction ``v`` maximising ``sum_i ((pos[i] - neg[i]) . v)^2``: the shift every pair
    shares counts, so when the pairs agree this is close to their mean difference. This is
    repeng's ``pca_center`` (PCA of both sides with each pair's mean subtracted: the rows
    ``+-(pos[i] - neg[i]) / 2`` have mean zero, so sklearn's centring does nothing and the top
    component is this vector). tlextract called it ``pca_diff`` until it was renamed.

    Pairing is by position: example ``i`` of ``pos`` with example ``i`` of ``neg``, for
    ``i < min(n_pos, n_neg)``; extra examples on the longer side are ignored. Put the two sides
    in the same question order to make the pairs meaningful. Unit norm; the sign puts positives
    higher on average (repeng instead takes the sign most pairs agree with). Deterministic;
    ``seed`` is unused.
    """
    return _top_difference_component(pos, neg, center=False, name="pca_uncentered")


def pca_centered(
    pos: Float[Tensor, "n_pos layer d_model"],
    neg: Float[Tensor, "n_neg layer d_model"],
    *,
    seed: int = 0,
) -> Float[Tensor, "layer d_model"]:
    """First principal component of the paired differences, *centred* on their mean.

    This is repeng's ``pca_diff`` (sklearn ``PCA(n_components=1)`` of ``h_pos - h_neg``, which
    centres). Centring removes the shift the pairs share, so the result is the direction along
    which the pairs *disagree* most; when every pair moves by the same trait shift, that shift is
    not in it. Pairing, norm and sign as in :func:`pca_uncentered`. Deterministic; ``seed`` is
    unused.
    """
    return _top_difference_component(pos, neg, center=True, name="pca_centered")


# ---------------------------------------------------------------------------------------------
# ica


def _sym_decorrelate(w: Float[Tensor, "layer comp k"]) -> Float[Tensor, "layer comp k"]:
    """(W W^T)^(-1/2) W: the nearest matrix with orthonormal rows."""
    evals, evecs = torch.linalg.eigh(w @ w.transpose(-1, -2))
    inv_sqrt = evals.clamp_min(torch.finfo(w.dtype).eps).rsqrt()
    return (evecs * inv_sqrt[:, None, :]) @ evecs.transpose(-1, -2) @ w


def _fast_ica(
    z: Float[Tensor, "layer n k"], *, max_iter: int, tol: float, seed: int
) -> Float[Tensor, "layer k k"]:
    """Symmetric FastICA (logcosh contrast) on whitened data; rows of the result unmix ``z``."""
    gen = torch.Generator().manual_seed(seed)
    k = z.shape[2]
    w = torch.randn(z.shape[0], k, k, generator=gen, dtype=torch.float64).to(z)
    w = _sym_decorrelate(w)
    for _ in range(max_iter):
        s = einsum(w, z, "layer comp k, layer n k -> layer n comp")
        g = torch.tanh(s)
        g_prime = 1.0 - g.pow(2)
        new = einsum(g, z, "layer n comp, layer n k -> layer comp k") / z.shape[1]
        new = _sym_decorrelate(new - g_prime.mean(dim=1)[..., None] * w)
        change = (einsum(new, w, "layer comp k, layer comp k -> layer comp").abs() - 1).abs()
        w = new
        if change.max() < tol:
            break
    return w


def ica(
    pos: Float[Tensor, "n_pos layer d_model"],
    neg: Float[Tensor, "n_neg layer d_model"],
    *,
    n_components: int | None = None,
    max_iter: int = 200,
    tol: float = 1e-6,
    seed: int = 0,
) -> Float[Tensor, "layer d_model"]:
    """The independent component that best separates positives from negatives, unit norm.

    Per layer: pool and centre all examples, reduce by PCA to ``k`` whitened components, run
    symmetric FastICA (logcosh, float64, seeded init), then
    pick the component whose scores have the largest |mean gap| / pooled std between positives
    and negatives -- not component 0, whose index is arbitrary. The returned vector is that
    component's *pattern* (its column of the mixing matrix mapped back to activation space: the
    direction along which the activations move when the source moves), with its sign set so
    that positives project higher.

    ``k = min(n_components, n - 1, d_model)``; by default ``n_components`` is
    ``clamp(n // 20, 2, 16)`` for n = n_pos + n_neg examples. ICA on few samples per dimension
    finds spurious non-Gaussian directions (FastICA stops converging), so the default keeps
    about 20 examples per component; the trait must then lie mostly within the top-k principal
    components of the pooled activations, which is what makes ICA the weakest method here.
    """
    check_inputs(pos, neg, "ica")
    n_pos = pos.shape[0]
    x = stack_layers(pos, neg)
    n, d_model = x.shape[1], x.shape[2]
    wanted = n_components if n_components is not None else min(max(n // 20, 2), 16)
    k = max(1, min(wanted, n - 1, d_model))
    xc = x - x.mean(dim=1, keepdim=True)
    u, s, vh = thin_svd(xc)
    z = u[..., :k] * n**0.5  # whitened PCA scores: unit variance, uncorrelated
    w = _fast_ica(z, max_iter=max_iter, tol=tol, seed=seed)
    sources = einsum(w, z, "layer comp k, layer n k -> layer n comp")
    best = _separation(sources, n_pos).argmax(dim=-1)
    w_best = w[torch.arange(w.shape[0], device=best.device), best]  # [layer, k]
    scale = s[:, :k] / n**0.5
    pattern = einsum(w_best * scale, vh[:, :k, :], "layer k, layer k d_model -> layer d_model")
    return finish_direction(pattern, pos, neg)
