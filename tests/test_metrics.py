"""Metrics against independent reference computations; splits; the evaluation table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from tlextract.errors import TLExtractError
from tlextract.ops.methods import run_method
from tlextract.ops.metrics import (
    LayerMetrics,
    auroc,
    cohens_d,
    evaluate_vectors,
    grouped_split_indices,
    midpoint_accuracy,
    project,
    projection_gap,
    split_indices,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def scores(seed: int, n: int, layers: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layers, generator=g) * 2
    return x.round() if ties else x  # rounding makes many exact ties


# ---------------------------------------------------------------------------------------------
# project


def test_project_is_the_dot_product_with_the_unit_direction():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(5, 3, 4, generator=g)
    vectors = torch.randn(3, 4, generator=g) * 7
    expected = torch.stack(
        [acts[:, layer] @ (vectors[layer] / vectors[layer].norm()) for layer in range(3)], dim=1
    )
    assert torch.allclose(project(acts, vectors), expected, atol=1e-6)
    # the norm of the vector does not matter
    assert torch.allclose(project(acts, vectors * 100), expected, atol=1e-6)


def test_project_onto_a_zero_vector_gives_zeros():
    acts = torch.randn(4, 2, 3)
    vectors = torch.zeros(2, 3)
    vectors[1, 0] = 2.0
    out = project(acts, vectors)
    assert out.dtype == torch.float32 and out.shape == (4, 2)
    assert torch.equal(out[:, 0], torch.zeros(4))
    assert torch.allclose(out[:, 1], acts[:, 1, 0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# per-layer metrics


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_equals_sklearn_roc_auc_score(ties):
    pos, neg = scores(1, 23, 4, ties) + 0.7, scores(2, 31, 4, ties)
    got = auroc(pos, neg)
    for layer in range(4):
        y = np.r_[np.ones(23), np.zeros(31)]
        s = np.r_[pos[:, layer].numpy(), neg[:, layer].numpy()]
        assert got[layer].item() == pytest.approx(roc_auc_score(y, s), abs=1e-6)


def test_auroc_extremes_and_all_ties():
    pos = torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 1.0]])
    neg = torch.tensor([[1.0, 3.0, 1.0], [2.0, 4.0, 1.0]])
    assert auroc(pos, neg).tolist() == [1.0, 0.0, 0.5]


def test_cohens_d_equals_a_numpy_computation():
    pos, neg = scores(3, 17, 3, False) + 1.0, scores(4, 12, 3, False)
    got = cohens_d(pos, neg)
    for layer in range(3):
        p, q = pos[:, layer].double().numpy(), neg[:, layer].double().numpy()
        pooled = np.sqrt(
            ((len(p) - 1) * p.var(ddof=1) + (len(q) - 1) * q.var(ddof=1)) / (len(p) + len(q) - 2)
        )
        assert got[layer].item() == pytest.approx((p.mean() - q.mean()) / pooled, rel=1e-5)


def test_cohens_d_by_hand():
    # pos mean 2, neg mean 0; sum of squares 2 + 2 over 4 - 2 dof: pooled sd sqrt(2)
    d = cohens_d(torch.tensor([[1.0], [3.0]]), torch.tensor([[-1.0], [1.0]]))
    assert d.item() == pytest.approx(2 / math.sqrt(2))


def test_cohens_d_without_spread_is_signed_infinity_or_zero_never_nan():
    pos = torch.tensor([[1.0, 0.0, 5.0]])
    neg = torch.tensor([[0.0, 1.0, 5.0]])
    assert cohens_d(pos, neg).tolist() == [math.inf, -math.inf, 0.0]


def test_projection_gap_is_the_difference_of_means():
    pos = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    neg = torch.tensor([[0.0, 5.0], [0.0, 7.0], [3.0, 0.0]])
    assert torch.allclose(projection_gap(pos, neg), torch.tensor([1.0, -2.0]), atol=1e-6)


def test_midpoint_accuracy_on_a_hand_checked_example():
    # layer 0: train means 3 and -1 -> threshold 1, positives above.
    #   test pos 1.5, 0.5, 3 -> 2/3 right; test neg 0, 1 (on the threshold: negative), 2 -> 2/3
    # layer 1: train means -2 and 3 -> threshold 0.5, positives BELOW (reversed direction).
    #   test pos 0, 1, 0 -> 2/3 right; test neg 0.5 (on the threshold: negative), 5, 5 -> 3/3
    train_pos = torch.tensor([[2.0, -3.0], [4.0, -1.0]])
    train_neg = torch.tensor([[0.0, 2.0], [-2.0, 4.0]])
    test_pos = torch.tensor([[1.5, 0.0], [0.5, 1.0], [3.0, 0.0]])
    test_neg = torch.tensor([[0.0, 0.5], [1.0, 5.0], [2.0, 5.0]])
    acc = midpoint_accuracy(train_pos, train_neg, test_pos, test_neg)
    assert acc[0].item() == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert acc[1].item() == pytest.approx((2 / 3 + 1) / 2)


def test_midpoint_accuracy_is_balanced():
    # everything classified positive: TPR 1, TNR 0 -> 0.5 however many positives there are
    acc = midpoint_accuracy(
        torch.tensor([[1.0]]), torch.tensor([[-1.0]]), torch.ones(9, 1), torch.ones(1, 1)
    )
    assert acc.item() == 0.5


def test_metrics_need_both_classes():
    with pytest.raises(TLExtractError, match="at least one positive and one negative"):
        auroc(torch.zeros(0, 2), torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------
# splits


def test_split_is_deterministic_disjoint_and_covering():
    train, test = split_indices(50, 0.2, seed=7)
    again = split_indices(50, 0.2, seed=7)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert len(test) == 10 and len(train) == 40
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(50))
    assert not torch.equal(test, split_indices(50, 0.2, seed=8)[1])


def test_split_keeps_one_example_on_each_side():
    assert [len(x) for x in split_indices(3, 0.01, seed=0)] == [2, 1]
    assert [len(x) for x in split_indices(3, 0.99, seed=0)] == [1, 2]
    assert [len(x) for x in split_indices(5, 0.0, seed=0)] == [5, 0]


@pytest.mark.parametrize("n,fraction", [(10, 1.0), (10, -0.1), (1, 0.5)])
def test_split_rejects_impossible_requests(n, fraction):
    with pytest.raises(TLExtractError):
        split_indices(n, fraction, seed=0)


def test_grouped_split_never_puts_a_group_on_both_sides():
    groups = [f"q{i % 7}" for i in range(40)]  # 7 questions, interleaved
    train, test = grouped_split_indices(groups, 0.3, seed=1)
    assert sorted(train.tolist() + test.tolist()) == list(range(40))
    train_groups = {groups[i] for i in train.tolist()}
    test_groups = {groups[i] for i in test.tolist()}
    assert not train_groups & test_groups
    assert len(test_groups) == 2  # round(7 * 0.3) questions
    again = grouped_split_indices(groups, 0.3, seed=1)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])


# ---------------------------------------------------------------------------------------------
# evaluation table and best layer


def planted_by_layer(n: int, strength: list[float], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    d = 16
    u = (
        F.normalize(torch.randn(len(strength), d, generator=g), dim=-1)
        * torch.tensor(strength)[:, None]
    )
    pos = torch.randn(n, len(strength), d, generator=g) + u
    neg = torch.randn(n, len(strength), d, generator=g) - u
    return pos, neg


def test_evaluate_scores_every_method_and_finds_the_informative_layer():
    pos, neg = planted_by_layer(50, [0.1, 2.0, 0.5], seed=0)
    train, test = split_indices(50, 0.4, seed=0)
    rows = [  # every method fitted on train, scored on test
        row
        for m in ("mean_diff", "probe")
        for row in evaluate_vectors(
            run_method(m, pos[train], neg[train]),
            pos[train],
            neg[train],
            pos[test],
            neg[test],
            method=m,
            layers=[4, 5, 6],
        )
    ]
    assert [(r.method, r.layer) for r in rows] == [
        (m, layer) for m in ("mean_diff", "probe") for layer in (4, 5, 6)
    ]
    for r in rows:
        assert all(math.isfinite(getattr(r, f)) for f in ("auroc", "cohens_d", "accuracy", "gap"))
    for m in ("mean_diff", "probe"):
        assert max((r for r in rows if r.method == m), key=lambda r: r.auroc).layer == 5
    strong = [r for r in rows if r.layer == 5]
    assert all(r.auroc > 0.95 and r.accuracy > 0.85 and r.cohens_d > 2 for r in strong)


def test_evaluate_vectors_uses_held_out_scores():
    vectors = torch.tensor([[1.0, 0.0]])
    train_pos, train_neg = torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[-2.0, 0.0]]])
    test_pos = torch.tensor([[[1.0, 9.0]], [[-1.0, 9.0]]])
    test_neg = torch.tensor([[[0.5, 9.0]], [[-3.0, 9.0]]])
    [row] = evaluate_vectors(
        vectors, train_pos, train_neg, test_pos, test_neg, method="x", layers=[3]
    )
    # test scores: pos 1, -1; neg 0.5, -3. Pairs won: 3 of 4. Threshold from train: 0.
    assert row == LayerMetrics(
        method="x",
        layer=3,
        auroc=0.75,
        cohens_d=row.cohens_d,
        accuracy=0.5,
        gap=1.25,
        train_auroc=1.0,
        norm=1.0,
    )
    assert row.cohens_d == pytest.approx(1.25 / math.sqrt((2 + 6.125) / 2))
