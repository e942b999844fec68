"""Extraction methods: plain functions from per-example activations to one direction per layer.

Every method takes ``pos`` [n_pos, layer, d_model] and ``neg`` [n_neg, layer, d_model] (any float
dtype, any device) and returns a finite float32 [layer, d_model] tensor on the same device. Layers
are independent: row ``i`` of the result uses only ``pos[:, i]`` and ``neg[:, i]``.

Conventions shared by all methods:

- **Sign**: every direction satisfies ``(mean(pos) - mean(neg)) . v >= 0``: positives project
  higher on average (for the PCA methods and ``ica``, whose sign is arbitrary, this is what fixes
  it).
- **Norm**: ``mean_diff`` is *not* normalised; its norm is the size of the shift between the
  classes and is what steering adds at coefficient 1. Every other method returns unit-norm rows.
  On degenerate input (no variation at all, e.g. ``pos == neg``) the row is finite but arbitrary.
- **One call convention**: every registered method is called as ``method(pos, neg, seed=seed)``
  (the :class:`Method` protocol); ``seed`` is keyword-only and unused by the deterministic
  methods. :func:`run_method` is that call by name. Further keyword options (``probe``'s ``l2``,
  ``ica``'s ``n_components``, ...) always have defaults; pass them by calling the function itself.

Internally the linear algebra runs in float64 (float32 on MPS, which has no float64); ``gradient``
optimises in float32.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor

from tlextract.errors import TLExtractError
from tlextract.ops.decompose import ica, pca_centered, pca_uncentered
from tlextract.ops.directions import (
    check_inputs,
    finish_direction,
    mean_diff,
    stack_layers,
    thin_svd,
    unit_rows,
    work_dtype,
)


@runtime_checkable
class Method(Protocol):
    """What every registered method is: ``(pos, neg, *, seed=0) -> [layer, d_model]``."""

    def __call__(
        self,
        pos: Float[Tensor, "n_pos layer d_model"],
        neg: Float[Tensor, "n_neg layer d_model"],
        *,
        seed: int = ...,
    ) -> Float[Tensor, "layer d_model"]: ...


# ---------------------------------------------------------------------------------------------
# probe


def _within_class_scale(
    x: Float[Tensor, "layer n d_model"], n_pos: int
) -> Float[Tensor, "layer 1 1"]:
    """RMS over features of the within-class std (each class centred on its own mean): one
    number per layer, so rescaling by it changes no direction. Never zero."""
    p, q = x[:, :n_pos], x[:, n_pos:]
    sq = (p - p.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2)) + (
        q - q.mean(dim=1, keepdim=True)
    ).pow(2).sum(dim=(1, 2))
    scale = (sq / (x.shape[1] * x.shape[2])).sqrt()
    fallback = x.abs().amax(dim=(1, 2))  # no within-class spread: use the data's own size
    scale = torch.where(scale > 0, scale, fallback)
    return torch.where(scale > 0, scale, 1.0)[:, None, None]


def _logistic_loss(
    logits: Float[Tensor, "*batch layer n"],
    y: Float[Tensor, " n"],
    weight: Float[Tensor, " n"],
    penalty: Float[Tensor, "*batch layer"],
) -> Float[Tensor, "*batch layer"]:
    return (F.softplus(logits) - y * logits).mul(weight).sum(dim=-1) + penalty


def _newton_logistic(
    feats: Float[Tensor, "layer n r"],
    y: Float[Tensor, " n"],
    weight: Float[Tensor, " n"],
    l2: float,
    max_iter: int,
) -> Float[Tensor, "layer r"]:
    """Minimise ``sum_i weight_i BCE(feats_i . beta + b, y_i) + l2/2 |beta|^2`` per layer by
    Newton's method with a backtracking (Armijo) line search; returns beta."""
    n_layer, _, r = feats.shape
    design = torch.cat([feats, feats.new_ones(n_layer, feats.shape[1], 1)], dim=-1)
    ridge = torch.cat([feats.new_full((r,), l2), feats.new_zeros(1)])  # intercept unpenalised
    theta = feats.new_zeros(n_layer, r + 1)
    steps = 0.5 ** torch.arange(30, dtype=feats.dtype, device=feats.device)  # 1, 1/2, 1/4, ...

    def loss_at(t: Tensor) -> Tensor:
        return _logistic_loss(
            einsum(design, t, "layer n r, ... layer r -> ... layer n"),
            y,
            weight,
            0.5 * (t.pow(2) * ridge).sum(dim=-1),
        )

    for _ in range(max_iter):
        logits = einsum(design, theta, "layer n r, layer r -> layer n")
        p = torch.sigmoid(logits)
        grad = einsum(design, weight * (p - y), "layer n r, layer n -> layer r") + ridge * theta
        if grad.abs().max() < 1e-10:
            break
        curvature = weight * p * (1 - p)
        hess = einsum(design * curvature[..., None], design, "layer n r, layer n s -> layer r s")
        hess = hess + torch.diag_embed(ridge + 1e-12)
        delta = torch.linalg.solve(hess, grad)
        # largest step 2^-k satisfying Armijo, chosen per layer
        trial = theta - steps[:, None, None] * delta  # [step, layer, r+1]
        decrease = (grad * delta).sum(dim=-1)
        ok = loss_at(trial) <= loss_at(theta) - 1e-4 * steps[:, None] * decrease
        first = torch.where(ok.any(dim=0), ok.float().argmax(dim=0), len(steps) - 1)
        theta = trial[first, torch.arange(n_layer, device=first.device)]
    return theta[:, :r]


def probe(
    pos: Float[Tensor, "n_pos layer d_model"],
    neg: Float[Tensor, "n_neg layer d_model"],
    *,
    l2: float = 0.1,
    max_iter: int = 100,
    seed: int = 0,
) -> Float[Tensor, "layer d_model"]:
    """L2-regularised logistic regression per layer; returns its weight vector, unit norm.

    Per layer, the activations are centred and divided by one number, the RMS over features of
    the within-class std (each class centred on its own mean), so ``l2`` means the same at every
    layer and in every model; being a single scalar, this rescaling changes no direction, and the
    weight vector is directly a direction in the original activation space: ``acts @ v`` ranks
    examples like the probe's logit. The probe minimises::

        sum_i c_i * BCE(w . z_i + b, y_i) + l2 / 2 * |w|^2,   c_i = 1 / (2 * n_class(i))

    so each class weighs half whatever the class sizes (sklearn's ``class_weight="balanced"`` with
    ``C = 1 / (l2 * n)``) and the intercept is not penalised. The optimum lies in the span of the
    centred examples, so it is solved exactly there, by Newton's method in float64 on at most
    min(n, d_model) coordinates. Deterministic; ``seed`` is unused.
    """
    check_inputs(pos, neg, "probe")
    if not l2 > 0:
        raise TLExtractError(f"probe: l2 must be > 0 (got {l2}); separable data need it.")
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    x = stack_layers(pos, neg)
    z = (x - x.mean(dim=1, keepdim=True)) / _within_class_scale(x, n_pos)
    y = torch.cat([z.new_ones(n_pos), z.new_zeros(n_neg)])
    weight = torch.cat([z.new_full((n_pos,), 0.5 / n_pos), z.new_full((n_neg,), 0.5 / n_neg)])
    directions = []
    for layer in z.split(1):  # one layer at a time: the Hessian is min(n, d_model)^2
        vh = thin_svd(layer)[2]  # rows span the examples
        feats = einsum(layer, vh, "one n d_model, one r d_model -> one n r")
        beta = _newton_logistic(feats, y, weight, l2, max_iter)  # w = vh^T beta
        directions.append(einsum(beta, vh, "one r, one r d_model -> one d_model"))
    return finish_direction(torch.cat(directions), pos, neg)


# ---------------------------------------------------------------------------------------------
# gradient


def _ledoit_wolf(centered: Float[Tensor, "layer n d_model"]) -> Float[Tensor, " layer"]:
    """Ledoit-Wolf shrinkage intensity of the covariance of already-centred rows (sklearn's
    ``ledoit_wolf_shrinkage(..., assume_centered=True)``), from n x n Gram matrices only."""
    n, d = centered.shape[1], centered.shape[2]
    sq_norms = centered.pow(2).sum(dim=-1)  # [layer, n]
    mu = sq_norms.sum(dim=-1) / (n * d)
    gram = centered @ centered.transpose(-1, -2)
    delta_ = gram.pow(2).sum(dim=(-1, -2)) / n**2
    beta_ = sq_norms.pow(2).sum(dim=-1)
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - d * mu.pow(2)) / d
    beta = torch.minimum(beta, delta)
    return torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(delta.dtype).tiny), 0.0)


def gradient(
    pos: Float[Tensor, "n_pos layer d_model"],
    neg: Float[Tensor, "n_neg layer d_model"],
    *,
    steps: int = 200,
    lr: float = 0.05,
    shrinkage: float | None = None,
    seed: int = 0,
) -> Float[Tensor, "layer d_model"]:
    """Direction maximising the standardised projection gap, found by gradient ascent; unit norm.

    Objective per layer, for a direction ``w``::

        J(w) = (mean(pos . w) - mean(neg . w)) / sqrt(w^T C w)

    where ``C`` is the pooled within-class covariance (each class centred on its own mean,
    divided by n_pos + n_neg) shrunk toward a multiple of the identity:
    ``C = (1 - a) S + a * tr(S) / d_model * I``. ``a = shrinkage``, or by default the
    Ledoit-Wolf estimate from the data: with fewer examples than dimensions the unshrunk
    ``S`` is singular and J is unbounded. The maximiser is regularised LDA; it is reached by
    Adam ascent on the analytic gradient of J, in float32, from a seeded random unit vector,
    renormalised every step, with the step size decayed to zero over ``steps`` (cosine). A tiny
    variance floor keeps J finite on any input.
    """
    check_inputs(pos, neg, "gradient")
    p, q = pos.float(), neg.float()
    mp, mq = p.mean(dim=0), q.mean(dim=0)
    delta = mp - mq  # [layer, d_model]
    centered = rearrange(torch.cat([p - mp, q - mq]), "n layer d_model -> layer n d_model")
    n, d_model = centered.shape[1], centered.shape[2]
    trace_per_dim = centered.pow(2).sum(dim=(1, 2)) / (n * d_model)  # [layer]
    if shrinkage is None:
        a = _ledoit_wolf(centered.to(work_dtype(centered))).float()
    elif 0.0 <= shrinkage <= 1.0:
        a = torch.full_like(trace_per_dim, shrinkage)
    else:
        raise TLExtractError(f"gradient: shrinkage must be in [0, 1], got {shrinkage}.")
    floor = 1e-6 * (trace_per_dim + delta.pow(2).mean(dim=-1)) + 1e-30
    ridge = (a * trace_per_dim + floor)[:, None]  # [layer, 1]
    within = (1 - a)[:, None] / n  # [layer, 1]

    gen = torch.Generator().manual_seed(seed)
    w = unit_rows(torch.randn(delta.shape, generator=gen).to(delta.device))
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(steps):
        # J = g / sqrt(c) with g = delta . w, c = w^T C w;  dJ/dw = delta / sqrt(c) - g C w / c^1.5
        proj = (centered @ w[..., None])[..., 0]  # [layer, n]
        cw = within * (proj[:, None, :] @ centered)[:, 0, :] + ridge * w  # C w
        c = (w * cw).sum(dim=-1, keepdim=True)
        g = (delta * w).sum(dim=-1, keepdim=True)
        grad = delta / c.sqrt() - g * cw / c.pow(1.5)
        # Adam ascent step, cosine-decayed step size, back onto the unit sphere
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad.pow(2)
        m_hat, v_hat = m / (1 - beta1 ** (t + 1)), v / (1 - beta2 ** (t + 1))
        step = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        w = w + step * m_hat / (v_hat.sqrt() + eps)
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return finish_direction(w, pos, neg)


# ---------------------------------------------------------------------------------------------
# registry


METHODS: dict[str, Method] = {
    "mean_diff": mean_diff,
    "probe": probe,
    "pca_uncentered": pca_uncentered,
    "pca_centered": pca_centered,
    "ica": ica,
    "gradient": gradient,
}


# Names that once meant something else: refused with what to write instead, never remapped.
RENAMED = {
    "pca_diff": (
        "tlextract's 'pca_diff' was the top singular vector of the uncentred paired differences, "
        "which is repeng's 'pca_center' and is now 'pca_uncentered'; repeng's 'pca_diff' (PCA of "
        "the centred differences) is 'pca_centered'. Choose one of the two"
    ),
}


def get_method(name: str) -> Method:
    """The extraction function registered under ``name``."""
    if name in RENAMED:
        raise TLExtractError(f"extraction method {name!r} was renamed: {RENAMED[name]}.")
    try:
        return METHODS[name]
    except KeyError:
        raise TLExtractError(
            f"unknown extraction method {name!r}; valid methods: {', '.join(METHODS)}."
        ) from None


def run_method(
    name: str,
    pos: Float[Tensor, "n_pos layer d_model"],
    neg: Float[Tensor, "n_neg layer d_model"],
    *,
    seed: int = 0,
) -> Float[Tensor, "layer d_model"]:
    """Method ``name`` on ``pos`` and ``neg``: ``get_method(name)(pos, neg, seed=seed)``."""
    return get_method(name)(pos, neg, seed=seed)
