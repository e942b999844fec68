"""How well vectors separate the classes: projections, per-layer metrics, held-out splits.

Scores are projections onto the *unit* direction of each layer's vector (:func:`project`), so
every metric is independent of the vector's norm and of the method that produced it. Metrics
return float32 tensors on the CPU. Per-layer
metrics take ``pos_scores`` [n_pos, layer] and ``neg_scores`` [n_neg, layer] and return one
value per layer. A higher score means "more of the trait": metrics are signed, so a vector that
points the wrong way gets AUROC < 0.5 and a negative Cohen's d rather than being silently
flipped.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor

from tlextract.errors import TLExtractError


def project(
    acts: Float[Tensor, "n layer d_model"], vectors: Float[Tensor, "layer d_model"]
) -> Float[Tensor, "n layer"]:
    """Scalar projection of each activation onto its layer's unit direction, in float32.

    An all-zero vector gives all-zero scores.
    """
    v = vectors.float()
    norm = v.norm(dim=-1)
    unit = v / torch.where(norm > 0, norm, 1.0)[:, None]
    return einsum(acts.float(), unit.to(acts.device), "n layer d_model, layer d_model -> n layer")


def auroc(
    pos_scores: Float[Tensor, "n_pos layer"], neg_scores: Float[Tensor, "n_neg layer"]
) -> Float[Tensor, " layer"]:
    """Area under the ROC curve per layer: P(pos > neg) + 0.5 * P(pos == neg).

    This is the Mann-Whitney statistic, equal to sklearn's ``roc_auc_score`` with positives
    labelled 1, ties counting half. Exact, O(n log n) (sort + binary search), float64 inside.
    """
    _need_both(pos_scores, neg_scores, "auroc")
    neg_sorted = _f64(neg_scores).T.contiguous().sort(dim=-1).values  # [layer, n_neg]
    p = _f64(pos_scores).T.contiguous()  # [layer, n_pos]
    below = torch.searchsorted(neg_sorted, p, side="left")
    at_or_below = torch.searchsorted(neg_sorted, p, side="right")
    wins = below.double() + 0.5 * (at_or_below - below).double()
    return (wins.sum(dim=-1) / (p.shape[-1] * neg_sorted.shape[-1])).float()


def cohens_d(
    pos_scores: Float[Tensor, "n_pos layer"], neg_scores: Float[Tensor, "n_neg layer"]
) -> Float[Tensor, " layer"]:
    """(mean_pos - mean_neg) / pooled std, per layer.

    Pooled std: ``sqrt(((n_pos - 1) var_pos + (n_neg - 1) var_neg) / (n_pos + n_neg - 2))`` with
    unbiased variances (the denominator is clamped to 1 when each class has one example). When
    the pooled std is 0 the result is 0 for equal means and +/-inf otherwise; never NaN.
    """
    _need_both(pos_scores, neg_scores, "cohens_d")
    p, q = _f64(pos_scores), _f64(neg_scores)
    gap = p.mean(dim=0) - q.mean(dim=0)
    within = (p - p.mean(dim=0)).pow(2).sum(dim=0) + (q - q.mean(dim=0)).pow(2).sum(dim=0)
    sd = (within / max(p.shape[0] + q.shape[0] - 2, 1)).sqrt()
    d = torch.where(sd > 0, gap / torch.where(sd > 0, sd, 1.0), gap.sign() * math.inf)
    return d.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf).float()


def projection_gap(
    pos_scores: Float[Tensor, "n_pos layer"], neg_scores: Float[Tensor, "n_neg layer"]
) -> Float[Tensor, " layer"]:
    """mean_pos - mean_neg per layer, in activation units."""
    _need_both(pos_scores, neg_scores, "projection_gap")
    return (_f64(pos_scores).mean(dim=0) - _f64(neg_scores).mean(dim=0)).float()


def midpoint_accuracy(
    train_pos: Float[Tensor, "n_train_pos layer"],
    train_neg: Float[Tensor, "n_train_neg layer"],
    test_pos: Float[Tensor, "n_test_pos layer"],
    test_neg: Float[Tensor, "n_test_neg layer"],
) -> Float[Tensor, " layer"]:
    """Balanced accuracy of a threshold fitted on train scores, applied to test scores.

    The threshold is the midpoint between the train class means; the side of it that counts as
    positive is the side of the train positive mean (so a reversed direction is still
    classified through train data only, never peeking at test labels). A test score exactly on
    the threshold counts as negative. Balanced accuracy = (TPR + TNR) / 2, so a constant guess
    scores 0.5 whatever the class sizes.
    """
    _need_both(train_pos, train_neg, "midpoint_accuracy (train)")
    _need_both(test_pos, test_neg, "midpoint_accuracy (test)")
    mp, mn = _f64(train_pos).mean(dim=0), _f64(train_neg).mean(dim=0)
    threshold = (mp + mn) / 2
    orient = torch.where(mp >= mn, 1.0, -1.0).double()
    tpr = ((_f64(test_pos) - threshold) * orient > 0).double().mean(dim=0)
    tnr = ((_f64(test_neg) - threshold) * orient <= 0).double().mean(dim=0)
    return ((tpr + tnr) / 2).float()


def _f64(scores: Float[Tensor, "n layer"]) -> Float[Tensor, "n layer"]:
    """Scores are small: metrics run on the CPU in float64 (which MPS lacks)."""
    return scores.detach().cpu().double()


def _need_both(pos: Tensor, neg: Tensor, what: str) -> None:
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise TLExtractError(
            f"{what}: needs at least one positive and one negative score "
            f"(got {pos.shape[0]} and {neg.shape[0]}); enlarge the data or the test fraction."
        )


# ---------------------------------------------------------------------------------------------
# held-out splits


def _n_test(n: int, test_fraction: float, what: str) -> int:
    if not 0.0 <= test_fraction < 1.0:
        raise TLExtractError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    if test_fraction == 0.0:
        return 0
    if n < 2:
        raise TLExtractError(
            f"cannot hold out a test set from {n} {what}: need at least 2 (or test_fraction=0)."
        )
    return min(max(round(n * test_fraction), 1), n - 1)


def split_indices(
    n: int, test_fraction: float, seed: int
) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """Deterministic random split of ``range(n)`` into sorted (train, test) index tensors.

    ``round(n * test_fraction)`` indices go to test, at least 1 and at most n - 1 when
    ``test_fraction > 0``. The same (n, test_fraction, seed) always gives the same split.
    """
    n_test = _n_test(n, test_fraction, "examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def grouped_split_indices(
    groups: Sequence[Hashable], test_fraction: float, seed: int
) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """Like :func:`split_indices`, but whole groups go to one side.

    ``groups[i]`` is the group of example ``i`` (e.g. its question). Distinct groups are split
    with :func:`split_indices` (``test_fraction`` counts groups, not examples; groups are
    ordered by first appearance, so the split depends only on the sequence and the seed), and
    every example follows its group: no group is ever in both train and test.
    """
    distinct = list(dict.fromkeys(groups))
    _, test_groups = split_indices(len(distinct), test_fraction, seed)
    in_test = {distinct[i] for i in test_groups.tolist()}
    is_test = torch.tensor([g in in_test for g in groups], dtype=torch.bool)
    idx = torch.arange(len(groups))
    return idx[~is_test], idx[is_test]


# ---------------------------------------------------------------------------------------------
# evaluation table


@dataclass(frozen=True)
class LayerMetrics:
    """Metrics of one method's vector at one layer. Held-out (test) unless named ``train_``."""

    method: str
    layer: int  # TransformerLens block index
    auroc: float
    cohens_d: float
    accuracy: float  # balanced accuracy at the midpoint of the train class means
    gap: float  # mean projection gap on test, activation units
    train_auroc: float
    norm: float  # norm of the vector itself (meaningful for mean_diff only)


def evaluate_vectors(
    vectors: Float[Tensor, "layer d_model"],
    train_pos: Float[Tensor, "n_train_pos layer d_model"],
    train_neg: Float[Tensor, "n_train_neg layer d_model"],
    test_pos: Float[Tensor, "n_test_pos layer d_model"],
    test_neg: Float[Tensor, "n_test_neg layer d_model"],
    *,
    method: str = "",
    layers: Sequence[int] | None = None,
) -> list[LayerMetrics]:
    """One :class:`LayerMetrics` per row of ``vectors`` (already fitted, e.g. on the train set).

    ``layers[i]`` is the block index of row ``i`` (default ``0..layer-1``).
    """
    n_layer = vectors.shape[0]
    block = list(layers) if layers is not None else list(range(n_layer))
    if len(block) != n_layer:
        raise TLExtractError(f"got {len(block)} layer indices for {n_layer} vectors.")
    tr_p, tr_n = project(train_pos, vectors), project(train_neg, vectors)
    te_p, te_n = project(test_pos, vectors), project(test_neg, vectors)
    columns = {
        "auroc": auroc(te_p, te_n),
        "cohens_d": cohens_d(te_p, te_n),
        "accuracy": midpoint_accuracy(tr_p, tr_n, te_p, te_n),
        "gap": projection_gap(te_p, te_n),
        "train_auroc": auroc(tr_p, tr_n),
        "norm": vectors.float().norm(dim=-1),
    }
    values = {k: [float(x) for x in v.tolist()] for k, v in columns.items()}
    return [
        LayerMetrics(method=method, layer=int(block[i]), **{k: v[i] for k, v in values.items()})
        for i in range(n_layer)
    ]
