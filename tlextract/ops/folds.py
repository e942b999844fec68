"""Nested cross-validation by example index: every example scored once, every choice made on
data that score never saw.

Rows are the pooled activations of both polarities (``y`` True for pos) and ``groups[i]`` is row
``i``'s example index: a pos and a neg row of one index share a question, so whole indices go to
one fold (:func:`fold_of`). For each outer fold the layer is chosen by an *inner*
cross-validation on the other folds alone (fit on all but one of them, score the one left out,
highest pooled AUROC wins, then Cohen's d, then the lower layer), the method is fitted on all
the other folds, and the outer fold is scored at that layer. The outer scores of all folds,
pooled, give the reported figures.

Scores are standardised per fit (:func:`standardize`) so folds pool: 0 is the midpoint of the
training class means and 1 the training within-class standard deviation; positive reads "pos".
A direction's sign is kept (a reversed vector scores below 0.5 AUROC, never silently flipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tlextract.config import EVALUATION
from tlextract.errors import TLExtractError
from tlextract.ops.metrics import auroc, cohens_d, project

# A fitting rule: (pos rows, neg rows) of [n, layer, d_model] -> [layer, d_model] directions.
Fit = Callable[[Tensor, Tensor], Tensor]


def fold_of(
    groups: Sequence[Hashable], k: int = EVALUATION.folds, seed: int = 0, *, arg: str = "folds="
) -> Int[Tensor, " n"]:
    """Fold (0..k-1) of each row: distinct groups in a seeded random order, dealt round-robin,
    so fold sizes differ by at most one group and a group never spans two folds. ``arg``: how
    the caller's caller sets ``k`` (its parameter, e.g. ``evaluate(folds=...)``), named in the
    error."""
    distinct = sorted(set(groups), key=str)
    if k < 2 or len(distinct) < k:
        raise TLExtractError(
            f"cross-validation: {k} folds need at least {max(k, 2)} examples "
            f"(got {len(distinct)}); extract more examples or use fewer folds ({arg}).",
            parameters=("folds",),
        )
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed))
    fold = {distinct[int(j)]: i % k for i, j in enumerate(order)}
    return torch.tensor([fold[g] for g in groups])


def standardize(
    train: Float[Tensor, "n_train layer"],
    y_train: Bool[Tensor, " n_train"],
    test: Float[Tensor, "n_test layer"],
) -> Float[Tensor, "n_test layer"]:
    """(test - midpoint of the train class means) / train pooled within-class std, per layer."""
    p, q = train[y_train].double(), train[~y_train].double()
    mid = (p.mean(0) + q.mean(0)) / 2
    within = (p - p.mean(0)).pow(2).sum(0) + (q - q.mean(0)).pow(2).sum(0)
    sd = (within / max(len(p) + len(q) - 2, 1)).sqrt()
    return ((test.double() - mid) / torch.where(sd > 0, sd, 1.0)).float()


def standardize_oriented(
    train: Float[Tensor, "n_train layer"],
    y_train: Bool[Tensor, " n_train"],
    test: Float[Tensor, "n_test layer"],
) -> Float[Tensor, "n_test layer"]:
    """:func:`standardize` of a score with no sign of its own (a random direction, a response
    length): flipped first if the training pos mean is the lower, so positive reads "pos"."""
    sign = 1.0 if train[y_train].mean() >= train[~y_train].mean() else -1.0
    return standardize(sign * train, y_train, sign * test)


def fit_and_score(
    acts: Float[Tensor, "n layer d_model"],
    y: Bool[Tensor, " n"],
    train: Bool[Tensor, " n"],
    fit: Fit,
) -> tuple[Float[Tensor, "n_test layer"], Float[Tensor, "layer d_model"]]:
    """Fit on the ``train`` rows, return the standardised scores of the others at every layer
    and the fitted directions."""
    if not (y & train).any() or not (~y & train).any():
        raise TLExtractError(
            "cross-validation: a training fold has no pos or no neg example; extract more "
            "examples or use fewer folds."
        )
    vectors = fit(acts[train & y], acts[train & ~y])
    proj = project(acts, vectors)
    return standardize(proj[train], y[train], proj[~train]), vectors


def pick_layer(z: Float[Tensor, "n layer"], y: Bool[Tensor, " n"]) -> int:
    """tlextract's one best-layer rule, on out-of-fold scores: the column with the highest
    AUROC, then Cohen's d, then the lowest index (NaN counts as worst).

    Every layer tlextract names comes from here: each outer fold's choice inside
    :func:`nested` and :attr:`Nested.layer`, which the result card, the report, the Ray
    summary, ``Extraction.evaluate`` and the steer/monitor defaults all read."""
    broken = z.isnan().any(dim=0)  # a NaN score would rank as a perfect one
    a = auroc(z[y], z[~y]).masked_fill(broken, -1.0)
    d = cohens_d(z[y], z[~y]).masked_fill(broken, -math.inf)
    return max(range(z.shape[1]), key=lambda i: (float(a[i]), float(d[i]), -i))


def out_of_fold(
    acts: Float[Tensor, "n layer d_model"],
    y: Bool[Tensor, " n"],
    fold: Int[Tensor, " n"],
    fit: Fit,
    among: Bool[Tensor, " n"] | None = None,
) -> Float[Tensor, "n layer"]:
    """Every ``among`` row's standardised score at every layer from the fit on the other folds
    of ``among`` (default: all rows); rows outside ``among`` are NaN."""
    among = torch.ones_like(y) if among is None else among
    z = torch.full((len(y), acts.shape[1]), float("nan"))
    for f in fold[among].unique().tolist():
        test = among & (fold == f)
        z[test] = fit_and_score(acts, y, among & ~test, fit)[0][test[~(among & ~test)]]
    return z


@dataclass(frozen=True)
class Nested:
    """Outer scores of a nested cross-validation: ``scores[i]`` is row ``i``'s standardised
    score at the layer (column) chosen for its fold, ``columns[f]`` that choice."""

    scores: Float[Tensor, " n"]
    columns: list[int]
    per_layer: Float[Tensor, "n layer"]  # outer scores at every layer (descriptive only)
    directions: list[Float[Tensor, " d_model"]]  # fold f's direction at its column
    layer: int  # the column to use full-data vectors at: :func:`pick_layer` of ``per_layer``


def nested(
    acts: Float[Tensor, "n layer d_model"],
    y: Bool[Tensor, " n"],
    fold: Int[Tensor, " n"],
    fit: Fit,
) -> Nested:
    """Outer folds scored at the layer an inner cross-validation of the other folds chose."""
    scores = torch.full((len(y),), float("nan"))
    per_layer = torch.full((len(y), acts.shape[1]), float("nan"))
    columns, directions = [], []
    for f in range(int(fold.max()) + 1):
        test = fold == f
        inner = out_of_fold(acts, y, fold, fit, among=~test)
        column = pick_layer(inner[~test], y[~test])
        z, vectors = fit_and_score(acts, y, ~test, fit)
        scores[test], per_layer[test] = z[:, column], z
        columns.append(column)
        directions.append(vectors[column])
    return Nested(scores, columns, per_layer, directions, pick_layer(per_layer, y))


def random_direction_scores(
    acts: Float[Tensor, "n layer d_model"],
    y: Bool[Tensor, " n"],
    fold: Int[Tensor, " n"],
    columns: Sequence[int],
    seed: int = 0,
) -> Float[Tensor, " n"]:
    """Null: each outer fold scored by a random unit direction at the column the real vector
    chose for it, its sign and scale set on that fold's training rows as the real vector's are
    (so the null is "any direction, fitted as little as the vector is")."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.full((len(y),), float("nan"))
    for f, column in enumerate(columns):
        test = fold == f
        direction = torch.randn(1, acts.shape[-1], generator=gen)
        proj = project(acts[:, column : column + 1], direction)
        scores[test] = standardize_oriented(proj[~test], y[~test], proj[test])[:, 0]
    return scores


def shuffled_labels(
    y: Bool[Tensor, " n"], groups: Sequence[Hashable], fold: Int[Tensor, " n"], seed: int = 0
) -> Bool[Tensor, " n"]:
    """Null labels: in every fold, half of the examples (a seeded random half) have their pos
    and neg rows swapped, so each fold's pseudo-classes hold as many true pos as true neg rows
    and carry no trait. (Independent coin flips would leave a random majority that a strong
    trait then shows through, far from chance either way.)"""
    gen = torch.Generator().manual_seed(seed)
    flip: dict[Hashable, bool] = {}
    for f in fold.unique().tolist():
        members = sorted({g for g, k in zip(groups, fold.tolist(), strict=True) if k == f}, key=str)
        order = torch.randperm(len(members), generator=gen).tolist()
        # Odd folds alternate which side gets the extra example.
        half = (len(members) + f % 2) // 2
        flip |= {members[j]: rank < half for rank, j in enumerate(order)}
    return y ^ torch.tensor([flip[g] for g in groups])
